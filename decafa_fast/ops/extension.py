"""Loading the C++ extension decafa_fast._C: the one built at install, else the first-use build
(decafa_fast/_build.py). Importing this module loads it (its static registrations implement the decafa::
ops); `extension_error` says why it could not, in one line, and `extension_path` is the library loaded."""
from __future__ import annotations

extension_error: str | None = None
extension_path: str | None = None  # the loaded library (cpu_cache finds its C entry points there)

try:
    from .. import _C  # (loads the TORCH_LIBRARY_IMPL(decafa, ...) registrations)

    extension_path = _C.__file__
except ImportError:  # not built at install (build isolation hid torch): build on first use
    from .. import _build

    try:
        extension_path = str(_build.load_or_build())
    except (RuntimeError, OSError) as exc:  # BuildError says why in one line; an OSError names its file
        extension_error = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # one line, whatever raised
