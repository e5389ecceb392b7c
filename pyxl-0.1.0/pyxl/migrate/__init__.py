"""Host-to-host migration: ``xl migrate`` / ``xl migrate-receive`` for pyxl.

Theory of operation.  A sender (:func:`migrate`, :mod:`.sender`) reaches a
receiver (:func:`receive`, :mod:`.receiver`) over TCP or through a command's
stdin/stdout (``ssh host pyxl migrate-receive``, as xl does; :mod:`.connection`)
and they speak xl's handshake byte for byte (:mod:`.handshake`, sans-I/O, so
either end interoperates with xl's): the receiver's banner; the stream ``pyxl
save`` writes (xl header + libxl v2 stream) from a live save that leaves the
source paused; "domain received, ready to unpause" once the receiver restored
it, paused, as ``NAME--incoming``; "domain is yours, you are cleared to
unpause" once the sender renamed its source ``NAME--migratedaway``; and the
receiver's unpause status -- or, pyxl's one extension, "domain receive
failed: REASON" from a receiver that gave up.  Neither end blocks the event
loop: the save helper writes into a pipe, and :mod:`.relay` splices it to the
connection from the loop (counting bytes, pacing them for a bandwidth cap, so
the helper's precopy policy -- :mod:`.precopy` -- sees the capped rate); the
receiver feeds its restore helper through a pipe the same way, so that its
death is the sender's reset.  Failure semantics: the source is destroyed only
after the receiver reported its copy running; any failure before the sender
cleared the receiver leaves the source running and the receiver destroys what
it got; a connection lost after "cleared to unpause" leaves the source paused
(never two running copies) and raises :class:`MigrationInDoubt`; every other
failure is a :class:`MigrationError` (bad peer bytes: its subclass
``pyxl.errors.MigrationProtocolError``) whose ``source_state`` says what the
source is left in.  Remus streams (``remus=True``) checkpoint before the
switch-over, and a receiver whose sender vanished after a complete checkpoint
fails over to it.  Trust: across a network, either ssh (a command) or
mutual TLS (:mod:`.tls`: both ends verify each other against a CA, the
receiver may allow-list peer names; a TLS stage child process per connection,
:mod:`.tlsstage`, runs it and presents it as a pipe pair, so everything above
stays as it is and the loop never encrypts); a listening receiver
refuses plain TCP off loopback unless told ``insecure``, and drops peers
that fail TLS, send garbage or stay silent, listening on for the real one
(:mod:`.listener`).

This package's ``__init__`` only re-exports; loggers are ``pyxl.migrate``,
``pyxl.migrate.<domid>`` (a sender) and ``pyxl.migrate.receive``.
"""

from pyxl.errors import MigrationAuthError, MigrationError, MigrationInDoubt
from pyxl.migrate.address import parse_address
from pyxl.migrate.precopy import precopy_env
from pyxl.migrate.api import migrate, receive
from pyxl.migrate.receiver import ReceiveOperation, ReceiveResult
from pyxl.migrate.sender import MigrateOperation, MigrateResult
from pyxl.migrate.tls import TlsOptions

__all__ = ["MigrateOperation", "MigrateResult", "MigrationAuthError", "MigrationError",
           "MigrationInDoubt", "ReceiveOperation", "ReceiveResult", "TlsOptions", "migrate",
           "parse_address", "precopy_env", "receive"]
