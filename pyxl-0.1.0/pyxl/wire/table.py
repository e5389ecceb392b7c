"""The Xen 4.17 save/restore helper message table -- the single source of truth.

Everything that marshals helper messages is generated from this table by
``libxl_helper/genmsgs.py``: the helper's Cython send/callback stubs (at build
time) and the host codec's tables in ``pyxl/wire/_generated.py`` (committed; a test
checks that regenerating changes nothing).  Edit only this file.

Numbers are positional, as in Xen's ``libxl_save_msgs_gen.pl``: Xen 4.14
inserted ``static_data_done`` and renumbered everything after it, so the
numbering here is specific to Xen 4.14-4.17.

Columns: (name, senders, waits_for_reply, arguments).  ``senders`` names the
helper modes that may send it ("save", "restore").  A message whose
``waits_for_reply`` is true is a callback: the helper blocks on a 4-byte int
reply, and its CBFLAGS bit is ``1 << number``.  Argument wire types:

    uint16 / uint32 / int32 / uint64   little-endian fixed width
    string                             u32 length including the NUL, bytes, NUL
"""

# This module must stay free of imports: setup.py loads it by path at build
# time, before pyxl is importable.

MESSAGES = (
    # 1
    ("log", ("save", "restore"), False,
     (("level", "uint32"), ("errnoval", "int32"),
      ("context", "string"), ("formatted", "string"))),
    # 2
    ("progress", ("save", "restore"), False,
     (("context", "string"), ("doing_what", "string"),
      ("done", "uint64"), ("total", "uint64"))),
    # 3
    ("suspend", ("save", "restore"), True, ()),
    # 4
    ("postcopy", ("save", "restore"), True, ()),
    # 5
    ("checkpoint", ("save", "restore"), True, ()),
    # 6
    ("wait_checkpoint", ("save", "restore"), True, ()),
    # 7
    ("switch_qemu_logdirty", ("save",), True,
     (("domid", "uint32"), ("enable", "uint32"))),
    # 8
    ("static_data_done", ("restore",), True, (("missing", "uint32"),)),
    # 9: sent unconditionally by the helper, but libxc only asks for it when
    # CBFLAGS has this bit, so it owns bit 9 although nobody replies.
    ("restore_results", ("restore",), False,
     (("store_gfn", "uint64"), ("console_gfn", "uint64"))),
    # 10
    ("complete", ("save", "restore"), True,
     (("retval", "int32"), ("errnoval", "int32"))),
    # 11: pyxl's extension, never sent by Xen's helper (so Xen's numbering and
    # wire format are untouched).  pyxl's helper sends it only when the host
    # asked for it (PYXL_PRECOPY=host): once per precopy round, after the
    # log-dirty CLEAN, with its measurements; the reply is libxc's decision
    # (0 continue, 1 stop and copy, -1 abort).  Rates are pages/s; a predicted
    # downtime of 2**64-1 is unknown.
    ("precopy_round", ("save",), True,
     (("iteration", "uint32"), ("sent_pages", "uint64"), ("dirty_pages", "uint64"),
      ("dirty_rate", "uint64"), ("bandwidth", "uint64"), ("predicted_us", "uint64"),
      ("elapsed_us", "uint64"))),
)

# Messages that are callbacks libxc calls only when the caller installed them,
# i.e. the ones with a CBFLAGS bit.  log/progress/complete are always sent.
CALLBACK_BIT_MESSAGES = (
    "suspend", "postcopy", "checkpoint", "wait_checkpoint",
    "switch_qemu_logdirty", "static_data_done", "restore_results",
)
