"""The one check of an untrusted domain config, before any domain exists.

A restore builds a domain from the config in the stream's xl header, and that
stream may come from anyone who can write a save file or reach a migration
receiver.  Backends read the config with ``dict.get`` and ``int()``, and the
real-Xen one hands integers to libxenctrl through ctypes, where a negative
``target_memkb`` becomes an unlimited max-mem.  So :func:`check_config` looks at
types and ranges once, in the restore operation, for every backend:

* the shape: a JSON object at most :data:`MAX_DEPTH` deep (libxl's configs are
  5 or so), ``c_info`` and ``b_info`` objects (``b_info`` required);
* every number anywhere: an integer that fits 64 bits, or a finite float
  (``1e999`` parses as infinity; a huge integer would overflow ctypes);
* every string anywhere: encodable as UTF-8 (JSON allows lone surrogates);
* memory: ``b_info.max_memkb`` a positive integer up to :data:`MAX_MEMKB`,
  ``target_memkb`` (if given) positive and no more than ``max_memkb``;
* vCPUs: ``max_vcpus`` 1..:data:`MAX_VCPUS`, ``avail_vcpus`` a list of vCPU
  numbers below it;
* the other integers the real-Xen backend passes to Xen (event channels,
  grant frames, pool, ssidref, video and shadow memory, RTC offset);
* ``c_info.type`` pv/hvm/pvh; ``c_info.uuid`` libxl's 8-4-4-4-12 hex form;
  ``c_info.name`` as xl takes it (:func:`check_name`);
* what the receiving host runs and how (:func:`_check_programs`): a stream
  names no program (no ``device_model``, no hotplug script outside the host's
  script directory), adds no device-model arguments (``extra*``) and points no
  serial port at a file or socket; the disk and NIC lists are lists of objects
  whose words that reach QEMU's options or the hotplug scripts (vdev, mac,
  model, bridge, interface names, addresses, keymap, boot order) have their
  forms, so no comma adds an option.  The host paths a config names (disks, an
  HVM guest's kernel and ramdisk) and its bridges stay the sender's to choose,
  as under xl: a receiver that does not trust its senders with them checks
  them with the restore's ``config_check``.

A failure is a :class:`~pyxl.ConfigError` naming the field, one line.  The
checks are pyxl's: libxl would catch some later, after the domain exists.

May import: pyxl.errors.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any, Dict, List, Optional, Tuple

from pyxl.errors import ConfigError

__all__ = ["MAX_DEPTH", "MAX_GIVEN_NAME", "MAX_MEMKB", "MAX_NAME", "MAX_VCPUS", "XEN_SCRIPT_DIR",
           "check_config", "check_name"]

#: Where the hotplug scripts a config names are (libxl's default; the only place
#: a stream's config may take one from).
XEN_SCRIPT_DIR = "/etc/xen/scripts"

#: Deepest nesting of objects and lists accepted (libxl's configs nest ~5 deep).
MAX_DEPTH = 32
#: 16 TiB in KiB: Xen 4.17's x86 limit on a guest's memory (and far above any real one).
MAX_MEMKB = 16 << 30
#: Xen's MAX_VIRT_CPUS on x86 (HVM guests stop at 128).
MAX_VCPUS = 8192
#: Longest domain name accepted in a config, in characters.
MAX_NAME = 256
#: ... and given to a restore: room for a suffix (a migration's "--incoming").
MAX_GIVEN_NAME = MAX_NAME + 16
#: libxl's MemKB "unset" value (~0ULL), which a saved config may carry.
_MEMKB_DEFAULT = (1 << 64) - 1
_U32 = (1 << 32) - 1
_UUID = re.compile(r"\A[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
# C0 and C1 control characters and DEL: xl takes any other character but '/'.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Unicode line and paragraph separators, format characters (bidi controls among them).
_INVISIBLE = frozenset(("Zl", "Zp", "Cf"))
_PLAIN_KEY = re.compile(r"\A[A-Za-z0-9_.\-]{1,40}\Z")
# The words of a config that reach QEMU's options or a hotplug script's
# arguments: none holds a comma (QEMU's option separator), '/', '=' or a space.
_Form = Tuple["re.Pattern[str]", str]
_WORD: _Form = (re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_.+\-]{0,63}\Z"),
                "a word of letters, digits and . _ + - (at most 64)")
_IFNAME: _Form = (re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_.+\-]{0,14}\Z"),     # IFNAMSIZ - 1
                  "an interface name (letters, digits and . _ + -, at most 15)")
_MAC: _Form = (re.compile(r"\A[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}\Z"),
               "a MAC address (six hex pairs, colon-separated)")
_ADDRESSES: _Form = (re.compile(r"\A[0-9A-Fa-f.:/]{1,64}( [0-9A-Fa-f.:/]{1,64}){0,15}\Z"),
                     "IP addresses (at most 16, space-separated)")
_BOOT: _Form = (re.compile(r"\A[a-p]{1,8}\Z"), "a boot order (drive letters a-p)")
#: The serial ports a stream may ask of the device model (none is a file or a socket).
_SERIALS = ("pty", "none", "null")
_NIC_WORDS = (("mac", _MAC), ("model", _WORD), ("bridge", _IFNAME), ("ifname", _IFNAME),
              ("gatewaydev", _IFNAME), ("ip", _ADDRESSES), ("nictype", _WORD))
_DISK_WORDS = (("vdev", _WORD), ("format", _WORD), ("backend", _WORD))

# (field, lowest, highest) of the other integers a backend hands to Xen; each is optional.
_B_INFO_INTS: Tuple[Tuple[str, int, int], ...] = (
    ("event_channels", 0, _U32),
    ("max_grant_frames", -1, _U32),           # -1: libxl's "default"
    ("max_maptrack_frames", -1, _U32),
    ("max_grant_version", -1, 0xFF),
    ("rtc_timeoffset", 0, _U32),
)
_C_INFO_INTS: Tuple[Tuple[str, int, int], ...] = (("poolid", 0, _U32), ("ssidref", 0, _U32))
_MEMKB_FIELDS = ("video_memkb", "shadow_memkb")


def check_config(config: Any) -> None:
    """Raise :class:`~pyxl.ConfigError` unless ``config`` is a libxl config
    pyxl may build a domain from (see the module's docstring)."""
    if not isinstance(config, dict):
        raise ConfigError("(the config)", f"must be a JSON object, not {_kind(config)}")
    _walk(config)
    c_info = _object(config, "c_info", required=False)
    b_info = _object(config, "b_info", required=True)
    dtype = c_info.get("type")
    if dtype is not None and dtype not in ("pv", "hvm", "pvh"):
        raise ConfigError("c_info.type", "must be \"pv\", \"hvm\" or \"pvh\"")
    uuid = c_info.get("uuid")
    if uuid is not None and (not isinstance(uuid, str) or not _UUID.match(uuid)):
        raise ConfigError("c_info.uuid", "must be a uuid (8-4-4-4-12 hex digits)")
    name = c_info.get("name")
    if name is not None and name != "":
        check_name(name, "c_info.name")
    for field, low, high in _C_INFO_INTS:
        _int(c_info, "c_info", field, low, high)
    _check_memory(b_info)
    max_vcpus = _int(b_info, "b_info", "max_vcpus", 1, MAX_VCPUS)
    _check_avail_vcpus(b_info, max_vcpus if max_vcpus is not None else 1)
    for field, low, high in _B_INFO_INTS:
        _int(b_info, "b_info", field, low, high)
    for field in _MEMKB_FIELDS:
        value = _int(b_info, "b_info", field, 0, _MEMKB_DEFAULT)
        if value is not None and MAX_MEMKB < value < _MEMKB_DEFAULT:
            raise ConfigError(f"b_info.{field}", f"must be at most {MAX_MEMKB} KiB")
    hvm = b_info.get("type.hvm")
    if hvm is not None and not isinstance(hvm, dict):
        raise ConfigError("b_info.type.hvm", f"must be an object, not {_kind(hvm)}")
    if isinstance(hvm, dict):
        _int(hvm, "b_info.type.hvm", "mca_caps", 0, _MEMKB_DEFAULT)
    _check_programs(config, b_info, hvm or {})


def _check_programs(config: Dict[str, Any], b_info: Dict[str, Any], hvm: Dict[str, Any]) -> None:
    """What a stream may make the receiving host run, and with what words
    (see the module's docstring).  The host runs them as root."""
    if b_info.get("device_model") not in (None, ""):
        raise ConfigError("b_info.device_model", "names a program: the receiving host runs its "
                          "own device model, not one a stream names")
    for key in ("extra", "extra_pv", "extra_hvm"):
        if b_info.get(key) not in (None, []):
            raise ConfigError(f"b_info.{key}", "adds device-model arguments: those are the "
                              "receiving host's to give, not a stream's")
    serials = hvm.get("serial_list")
    if serials is not None and not isinstance(serials, list):
        raise ConfigError("b_info.type.hvm.serial_list", f"must be a list, not {_kind(serials)}")
    for i, port in enumerate([hvm.get("serial")] + list(serials or [])):
        if port not in (None, "") and port not in _SERIALS:
            where = "serial" if i == 0 else f"serial_list[{i - 1}]"
            raise ConfigError(f"b_info.type.hvm.{where}", "must be \"pty\", \"none\" or "
                              "\"null\" (a stream points no serial port at a file or socket)")
    _word(hvm, "b_info.type.hvm", "keymap", _WORD)
    _word(hvm, "b_info.type.hvm", "boot", _BOOT)
    for d, where in _objects(config, "disks"):
        _script(d, where)
        for key, form in _DISK_WORDS:
            _word(d, where, key, form)
    for n, where in _objects(config, "nics"):
        _script(n, where)
        for key, form in _NIC_WORDS:
            _word(n, where, key, form)


def _objects(config: Dict[str, Any], key: str) -> List[Tuple[Dict[str, Any], str]]:
    """A device list: None, or a list of objects; each with the name errors use."""
    value = config.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(key, f"must be a list, not {_kind(value)}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ConfigError(f"{key}[{i}]", f"must be an object, not {_kind(item)}")
        out.append((item, f"{key}[{i}]"))
    return out


def _script(device: Dict[str, Any], where: str) -> None:
    """A hotplug script: a name in the host's script directory (as xl's
    ``script=vif-bridge``), or that directory's path to it."""
    script = device.get("script")
    if script in (None, ""):
        return
    if isinstance(script, str) and script.startswith(XEN_SCRIPT_DIR + "/"):
        script = script[len(XEN_SCRIPT_DIR) + 1:]
    if not isinstance(script, str) or not _WORD[0].match(script):   # a name: no '/', no '..'
        raise ConfigError(f"{where}.script", f"must name a script in {XEN_SCRIPT_DIR} (a "
                          "stream names no other program)")


def _word(obj: Dict[str, Any], where: str, key: str, form: _Form) -> None:
    value = obj.get(key)
    if value in (None, ""):
        return
    if not isinstance(value, str) or not form[0].match(value):
        raise ConfigError(f"{where}.{key}", f"must be {form[1]}")


def check_name(name: Any, field: str = "c_info.name", limit: int = MAX_NAME) -> None:
    """A domain name as xl takes one: a non-empty string of at most ``limit``
    characters, without '/', control characters (C0, C1), Unicode line or
    paragraph separators or format characters (bidi controls)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(field, "must be a non-empty string")
    if len(name) > limit:
        raise ConfigError(field, f"is longer than {limit} characters")
    if "/" in name:
        raise ConfigError(field, "must not contain '/'")
    if _CONTROL.search(name):
        raise ConfigError(field, "must not contain control characters")
    for ch in name:
        # U+2028/2029 end a line for splitlines() and some log viewers (a name
        # could forge a "pyxl: error:" line); bidi and other format characters
        # (U+202E) reorder or hide what is shown of it.
        if unicodedata.category(ch) in _INVISIBLE:
            raise ConfigError(field, f"must not contain line or paragraph separators or "
                                     f"format characters (U+{ord(ch):04X})")
    _text(name, field)


def _check_memory(b_info: Dict[str, Any]) -> None:
    max_memkb = _int(b_info, "b_info", "max_memkb", 1, MAX_MEMKB)
    if max_memkb is None:
        raise ConfigError("b_info.max_memkb", "is missing (the new domain's memory)")
    target = _int(b_info, "b_info", "target_memkb", 1, MAX_MEMKB)
    if target is not None and target > max_memkb:
        raise ConfigError("b_info.target_memkb", f"({target}) must not exceed b_info.max_memkb "
                          f"({max_memkb})")


def _check_avail_vcpus(b_info: Dict[str, Any], max_vcpus: int) -> None:
    avail = b_info.get("avail_vcpus")
    if avail is None:
        return
    if not isinstance(avail, list):
        raise ConfigError("b_info.avail_vcpus", f"must be a list, not {_kind(avail)}")
    for i, cpu in enumerate(avail):
        if not _is_int(cpu) or not 0 <= cpu < max_vcpus:
            raise ConfigError(f"b_info.avail_vcpus[{i}]",
                              f"must be a vCPU number below max_vcpus ({max_vcpus})")


def _object(parent: Dict[str, Any], key: str, *, required: bool) -> Dict[str, Any]:
    value = parent.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        what = "is missing" if value is None else f"is {_kind(value)}"
        raise ConfigError(key, f"must be a JSON object, but {what}")
    return value


def _int(obj: Dict[str, Any], where: str, key: str, low: int, high: int) -> Optional[int]:
    """``obj[key]`` if present: an integer in [low, high], else ConfigError."""
    value = obj.get(key)
    if value is None:
        return None
    if not _is_int(value):
        raise ConfigError(f"{where}.{key}", f"must be an integer, not {_kind(value)}")
    if not low <= value <= high:
        raise ConfigError(f"{where}.{key}", f"{value} is out of range ({low}..{high})")
    return int(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _walk(config: Dict[str, Any]) -> None:
    """Depth, numbers and strings everywhere, without recursion (a hostile
    config must not be able to exhaust Python's stack)."""
    stack: List[Tuple[Any, str, int]] = [(config, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise ConfigError(path or "(the config)", f"nests deeper than {MAX_DEPTH} levels")
            items = (value.items() if isinstance(value, dict)
                     else ((f"[{i}]", v) for i, v in enumerate(value)))
            for key, child in items:
                if isinstance(value, dict):
                    _text(key, f"{path}.(a key)" if path else "(a key)")
                    sub = f"{path}.{_show(key)}" if path else _show(key)
                else:
                    sub = f"{path}{key}"
                stack.append((child, sub, depth + 1))
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            if not -(1 << 63) <= value <= _MEMKB_DEFAULT:
                raise ConfigError(path, "is an integer that does not fit 64 bits")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ConfigError(path, "is a number too large to represent")
        elif isinstance(value, str):
            _text(value, path)


def _text(s: str, field: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(field[:80], "is not valid Unicode (a lone surrogate)") from None


def _show(key: str) -> str:
    """A key as the error names it: as is when short and plain, else quoted and cut."""
    return key if _PLAIN_KEY.match(key) else repr(key[:24])


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            float: "a non-integer number", type(None): "null"}.get(type(value), "a number")
