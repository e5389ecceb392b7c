"""The helper's wire protocol, Xen 4.17's, from one table.

``table`` is the message table, the single source of truth (numbers, senders,
callbacks, argument types); ``_generated`` the host's message classes and
lookup tables produced from it by ``libxl_helper/genmsgs.py`` (committed, checked
by the build: ``make regen``; the helper's Cython stubs come from the same table
at build time); ``codec`` the sans-I/O codec (bytes in, messages out; replies
out as bytes) with the conversation rules libxl leaves implicit.  May import:
pyxl.errors only, and no I/O module.
"""

from pyxl.wire.codec import Conversation, Decoder, Message, cbflags_for, encode, encode_reply

__all__ = ["Conversation", "Decoder", "Message", "cbflags_for", "encode", "encode_reply"]
