"""Which shared libraries a Linux shared object asks for (its ELF ``DT_NEEDED`` entries).

Used twice, with no import of the package (``setup.py`` loads this file by its path):

* ``setup.py``, after linking ``stiefel_kernels._C``: a compiler driver that finds only a static
  ``libstdc++.a`` (a wrapper such as ``exec g++-real -B/opt/gcc/...`` whose library folder holds
  the archive first) links the C++ runtime *into* the extension. Loaded beside torch's shared
  ``libstdc++.so.6``, the process then holds two copies of the runtime, and the first error the
  extension raised (``TORCH_CHECK`` formats its message through ``std::ostream``) crashed the
  process with a segmentation fault inside that stream code instead of raising
  ``RuntimeError``. Seen on the lent H200 machine, 2026-11-26 (torch 2.11,
  ``CXX=/opt/gcc/bin/g++``, GCC 13.3); the same objects linked against ``libstdc++.so.6`` raised
  as they should. Such a driver is told to link the shared runtime.
* :mod:`stiefel_kernels._native`, before importing the extension: a module built that way is not
  loaded (the default torch kernels run, and a warning says why).
"""
from __future__ import annotations

import os
import struct
import subprocess

__all__ = ["needed_libraries", "links_cxx_runtime_statically",
           "driver_links_cxx_runtime_statically"]

_SHT_STRTAB, _SHT_DYNAMIC = 3, 6
_DT_NULL, _DT_NEEDED = 0, 1


def needed_libraries(path: str) -> list[str] | None:
    """The ``DT_NEEDED`` names of the 64-bit little-endian ELF file ``path`` (in their order),
    or ``None`` when it is not one (another format, truncated, no dynamic section). Reads the
    header, the section table, the dynamic section and its string table, not the whole file."""
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size

            def read(offset: int, size: int) -> bytes:
                if offset < 0 or size < 0 or offset + size > file_size:  # a corrupt header
                    raise ValueError("outside the file")
                f.seek(offset)
                data = f.read(size)
                if len(data) != size:
                    raise ValueError("truncated")
                return data

            head = read(0, 64)
            # e_ident: magic, ELFCLASS64 (2), ELFDATA2LSB (1)
            if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return None
            shoff, = struct.unpack_from("<Q", head, 0x28)
            shentsize, shnum = struct.unpack_from("<HH", head, 0x3A)
            if shentsize < 64 or shoff == 0:
                return None
            if shnum == 0:  # 0xff00 sections or more: the count is section 0's sh_size
                shnum, = struct.unpack_from("<Q", read(shoff, 64), 0x20)
            table = read(shoff, shnum * shentsize)
            sections = [struct.unpack_from("<IIQQQQIIQQ", table, i * shentsize)
                        for i in range(shnum)]
            for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
                if sh_type != _SHT_DYNAMIC:
                    continue
                dynamic = read(offset, size)
                _, str_type, _, _, str_off, str_size, _, _, _, _ = sections[link]  # .dynstr
                if str_type != _SHT_STRTAB:
                    return None
                strings = read(str_off, str_size)
                names = []
                for pos in range(0, size - 15, entsize or 16):
                    tag, val = struct.unpack_from("<qQ", dynamic, pos)
                    if tag == _DT_NULL:
                        break
                    if tag == _DT_NEEDED:
                        names.append(strings[val:strings.index(b"\0", val)].decode())
                return names
    except (OSError, struct.error, IndexError, ValueError, UnicodeDecodeError):
        return None
    return None


def links_cxx_runtime_statically(path: str) -> bool:
    """True when ``path`` is an ELF shared object that asks for no shared C++ runtime
    (``libstdc++.so.*`` or ``libc++.so.*``): for a C++ extension such as ``stiefel_kernels._C``
    that means the runtime was linked into it. False for anything else, or when it cannot tell."""
    needed = needed_libraries(path)
    if needed is None:
        return False
    return not any(n.startswith(("libstdc++.so", "libc++.so")) for n in needed)


def driver_links_cxx_runtime_statically(cxx: list[str], workdir: str) -> bool:
    """Does the C++ compiler driver ``cxx`` (a command, e.g. ``["g++"]``) link the C++ runtime
    into the shared objects it makes? One trial link in ``workdir``; False when the trial cannot
    run (no compiler, an error), so a caller changes nothing then."""
    src = os.path.join(workdir, "cxx_runtime_probe.cpp")
    out = os.path.join(workdir, "cxx_runtime_probe.so")
    with open(src, "w") as f:
        f.write("#include <sstream>\n#include <string>\n"
                "std::string probe(long x) { std::ostringstream s; s << x; return s.str(); }\n")
    try:
        subprocess.run([*cxx, "-shared", "-fPIC", src, "-o", out], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    except (OSError, subprocess.SubprocessError):
        return False
    return links_cxx_runtime_statically(out)
