"""The xl save-file header, Xen 4.17.

The xl header has no specification document; it is defined by xl itself in
Xen's ``tools/xl/xl.h`` (``struct save_file_header``, the
``XL_MANDATORY_FLAG_*`` bits and ``savefileheader_magic``), written by
``save_domain_core_writeconfig()`` in ``tools/xl/xl_saverestore.c`` and read
by ``create_domain()`` in ``tools/xl/xl_vmcontrol.c``.  All integers are in
the **writer's native byte order**::

    0   32  magic "Xen saved domain, xl format\\n \\0 \\r"
    32   4  byteorder 0x01020304 (xl refuses any other value)
    36   4  mandatory_flags: bit 0 JSON config, bit 1 STREAMv2; 4.17 writes 3.
            Unknown bits are refused.
    40   4  optional_flags (not checked)
    44   4  optional_data_len
    48   n  optional data: u32 config_len, config_len bytes of config

The config is libxl's JSON for the domain (yajl "beautify": 4-space indent,
a trailing newline) **plus a NUL, counted in config_len**.  The libxl
stream starts right after the optional data -- not 8-aligned in the file.
xl writes the u32 config_len even when there is no config (then 0, and the
JSON flag clear).

Readers check the magic, byteorder, mandatory flags, that the optional data
holds ``config_len`` bytes, and, with the JSON flag, that the config is
NUL-terminated, valid UTF-8 JSON (no NaN/Infinity, as yajl) and an object.
Like xl, the JSON text ends at the first NUL.  Bytes after the config inside
the optional data are ignored.  pyxl caps optional data at
``XL_OPTDATA_MAX`` (16 MiB; xl has no cap) and does not support streams
without the STREAMv2 flag (xl would run the legacy converter).

This module checks bytes already read (:func:`parse_xl_header`,
:func:`parse_xl_optional_data`); ``read_xl_header(fd)`` is in
:mod:`pyxl.streamio`, and the whole-stream scan in :mod:`pyxl.stream.scan`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Union

from pyxl.errors import CompressedImage
from pyxl.stream.framing import StreamError, TruncatedStream, UnsupportedStream
from pyxl.stream.libxc import DHDR_TYPE_X86_HVM, DHDR_TYPE_X86_PV
from pyxl.stream.libxl import libxc_context_record, libxl_header

__all__ = [
    "XL_MAGIC", "ZSTD_MAGIC", "XL_OPTIONAL_PYXL_ZSTD", "XL_BYTEORDER", "XL_FLAG_JSON", "XL_FLAG_STREAMV2", "XL_FLAGS_KNOWN",
    "XL_HEADER", "XL_OPTDATA_MAX", "XlHeader", "config_json", "xl_header", "save_prologue",
    "parse_xl_header", "parse_xl_optional_data", "guest_type_of_config",
    "max_vcpus_of_config",
]

WHERE = "xl header"

XL_MAGIC = b"Xen saved domain, xl format\n \0 \r"
assert len(XL_MAGIC) == 32
#: A zstd frame's first bytes (RFC 8878): a compressed pyxl image starts so.
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
#: pyxl's optional flag (xl ignores optional flags): a migration sender that
#: can send the rest compressed, if the receiver says so (pyxl.migrate.handshake).
XL_OPTIONAL_PYXL_ZSTD = 1 << 31
XL_BYTEORDER = 0x01020304
XL_FLAG_JSON = 1 << 0
XL_FLAG_STREAMV2 = 1 << 1
XL_FLAGS_KNOWN = XL_FLAG_JSON | XL_FLAG_STREAMV2
#: magic, byteorder, mandatory_flags, optional_flags, optional_data_len
XL_HEADER = struct.Struct("=32sIIII")
_U32 = struct.Struct("=I")
#: pyxl's cap on the optional data it reads (xl allocates whatever is declared)
XL_OPTDATA_MAX = 16 << 20


@dataclass(frozen=True)
class XlHeader:
    """A checked xl save-file header."""

    mandatory_flags: int
    optional_flags: int
    optional_data_len: int
    #: the config bytes as stored (config_len bytes, NUL included); None if absent
    config_bytes: Optional[bytes]
    #: the parsed JSON config (JSON flag set), else None
    config: Optional[Dict[str, Any]]

    @property
    def size(self) -> int:
        """Header plus optional data: where the libxl stream starts."""
        return XL_HEADER.size + self.optional_data_len

    @property
    def streamv2(self) -> bool:
        return bool(self.mandatory_flags & XL_FLAG_STREAMV2)

    @property
    def json(self) -> bool:
        return bool(self.mandatory_flags & XL_FLAG_JSON)

    @property
    def config_len(self) -> int:
        return len(self.config_bytes) if self.config_bytes is not None else 0

    @property
    def guest_type(self) -> Optional[int]:
        return guest_type_of_config(self.config)

    def to_json(self) -> Dict[str, Any]:
        return {
            "offset": 0,
            "size": self.size,
            "mandatory_flags": self.mandatory_flags,
            "optional_flags": self.optional_flags,
            "optional_data_len": self.optional_data_len,
            "config_len": self.config_len,
            "json": self.json,
            "streamv2": self.streamv2,
        }


def guest_type_of_config(config: Optional[Mapping[str, Any]]) -> Optional[int]:
    """libxc domain type for a libxl config (``c_info.type``): pv -> 1,
    hvm/pvh -> 2; None if absent or unknown."""
    if not isinstance(config, Mapping):
        return None
    c_info = config.get("c_info")
    ctype = c_info.get("type") if isinstance(c_info, Mapping) else None
    return {"pv": DHDR_TYPE_X86_PV, "hvm": DHDR_TYPE_X86_HVM,
            "pvh": DHDR_TYPE_X86_HVM}.get(ctype) if isinstance(ctype, str) else None


def max_vcpus_of_config(config: Optional[Mapping[str, Any]]) -> Optional[int]:
    """``b_info.max_vcpus`` of a libxl config if it is a positive int, else None."""
    if not isinstance(config, Mapping):
        return None
    b_info = config.get("b_info")
    n = b_info.get("max_vcpus") if isinstance(b_info, Mapping) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


# ---------------------------------------------------------------------------
# Writers


def config_json(config: Mapping[str, Any], *, indent: int = 4) -> bytes:
    """A config as libxl serialises it for xl: beautified JSON (yajl's
    4-space indent), a trailing newline, and the NUL that config_len counts."""
    text = json.dumps(config, indent=indent, ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8") + b"\n\0"


def xl_header(config: Union[Mapping[str, Any], bytes, str, None], *,
              indent: int = 4, optional_flags: int = 0) -> bytes:
    """The xl save-file header with its optional data.

    ``config`` is a libxl-style config dict (serialised by
    :func:`config_json`), or the JSON text as ``str``/``bytes`` (used as is,
    a NUL appended if missing), or None for a file without a config (xl
    then writes config_len 0 and leaves the JSON flag clear).  The result is
    checked with our own reader, so we never write what we would refuse.
    ``optional_flags``: 0 as xl writes it (readers ignore them; pyxl's
    migration offers compression with one, :data:`XL_OPTIONAL_PYXL_ZSTD`).
    """
    if config is None:
        cfg = b""
    elif isinstance(config, Mapping):
        cfg = config_json(config, indent=indent)
    else:
        cfg = config.encode("utf-8") if isinstance(config, str) else bytes(config)
        if not cfg.endswith(b"\0"):
            cfg += b"\0"
    flags = XL_FLAG_STREAMV2 | (XL_FLAG_JSON if cfg else 0)
    optdata = _U32.pack(len(cfg)) + cfg
    if len(optdata) > XL_OPTDATA_MAX:
        raise ValueError(f"config of {len(cfg)} bytes is too large")
    out = XL_HEADER.pack(XL_MAGIC, XL_BYTEORDER, flags, optional_flags, len(optdata)) + optdata
    try:
        parse_xl_optional_data(parse_xl_header(out), out[XL_HEADER.size:])
    except StreamError as err:
        raise ValueError(f"config cannot be stored: {err.reason}") from None
    return out


def save_prologue(config: Union[Mapping[str, Any], bytes, str, None], *,
                  indent: int = 4) -> bytes:
    """What the host writes before the save helper starts: the xl header,
    the libxl header and the empty LIBXC_CONTEXT record.  The helper's libxc
    stream follows; then ``pyxl.stream.libxl.libxl_trailer()``."""
    return xl_header(config, indent=indent) + libxl_header() + libxc_context_record()


# ---------------------------------------------------------------------------
# Readers


@dataclass(frozen=True)
class _Fixed:
    mandatory_flags: int
    optional_flags: int
    optional_data_len: int


def parse_xl_header(data: bytes, *, max_optional_data: int = XL_OPTDATA_MAX) -> _Fixed:
    """Check the fixed 48-byte part of an xl header."""
    if len(data) < XL_HEADER.size:
        raise TruncatedStream(len(data), "xl header is 48 bytes", WHERE)
    magic, byteorder, mandatory, optional, optlen = XL_HEADER.unpack_from(data)
    if magic != XL_MAGIC:
        if data[:4] == ZSTD_MAGIC:
            raise CompressedImage(0, "a zstd-compressed image, not an xl stream: pyxl restores "
                                  "it from a file; decompress it first (zstd -d) for xl or a "
                                  "pipe", WHERE)
        raise StreamError(0, "wrong magic (not an xl save file)", WHERE)
    if byteorder != XL_BYTEORDER:
        raise StreamError(32, f"byteorder {byteorder:#010x} != 0x01020304 in this host's "
                          "byte order", WHERE)
    bad = mandatory & ~XL_FLAGS_KNOWN
    if bad:
        raise StreamError(36, f"unknown mandatory flags {bad:#x} (known: JSON 0x1, "
                          "STREAMv2 0x2)", WHERE)
    if optlen > max_optional_data:
        raise UnsupportedStream(44, f"optional_data_len {optlen:#x} exceeds pyxl's limit "
                                f"{max_optional_data:#x}", WHERE)
    return _Fixed(mandatory, optional, optlen)


def _parse_config(cfg: bytes) -> Dict[str, Any]:
    nul = cfg.find(b"\0")
    if nul < 0:
        raise StreamError(52, "config is not NUL-terminated", WHERE)
    try:
        text = cfg[:nul].decode("utf-8")
    except UnicodeDecodeError as err:
        raise StreamError(52, f"config is not UTF-8 ({err.reason} at byte {err.start})",
                          WHERE) from None

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        obj = json.loads(text, parse_constant=no_constants)
    except ValueError as err:
        reason = err.msg if isinstance(err, json.JSONDecodeError) else str(err)
        raise StreamError(52, f"config is not valid JSON ({reason})", WHERE) from None
    except RecursionError:   # json's C scanner recurses per level: a hostile config
        raise StreamError(52, "config JSON nests too deeply", WHERE) from None
    if not isinstance(obj, dict):
        raise StreamError(52, "config JSON is not an object", WHERE)
    return obj


def parse_xl_optional_data(fixed: _Fixed, optdata: bytes) -> XlHeader:
    """Check the optional data (config_len and config) of an xl header."""
    if fixed.optional_data_len != len(optdata):  # pragma: no cover - caller bug
        raise ValueError("optional data length mismatch")
    config_bytes: Optional[bytes] = None
    config: Optional[Dict[str, Any]] = None
    if optdata:
        if len(optdata) < 4:
            raise StreamError(48, f"optional data of {len(optdata)} bytes has no room for "
                              "config_len", WHERE)
        (config_len,) = _U32.unpack_from(optdata)
        if config_len > len(optdata) - 4:
            raise StreamError(48, f"config_len {config_len} exceeds the {len(optdata) - 4} "
                              "bytes of optional data after it", WHERE)
        config_bytes = optdata[4:4 + config_len]
        if fixed.mandatory_flags & XL_FLAG_JSON:
            config = _parse_config(config_bytes)
    if not fixed.mandatory_flags & XL_FLAG_STREAMV2:
        raise UnsupportedStream(36, "STREAMv2 flag clear: a legacy (pre-4.6) stream, "
                                "which xl converts and pyxl does not support", WHERE)
    return XlHeader(fixed.mandatory_flags, fixed.optional_flags, fixed.optional_data_len,
                    config_bytes, config)
