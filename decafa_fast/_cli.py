"""The `decafa-fast` console script. The command line belongs to the face-alignment application, which comes
with the `app` extra; the bare install (the op library) has the script too, since a wheel's scripts cannot
depend on an extra, so without that extra this says in one line what to install instead of a traceback."""
from __future__ import annotations

import importlib.util
import sys

# the import name of each distribution of the `app` extra (pyproject.toml) -> that distribution
APP_EXTRA = {"cv2": "opencv-python-headless", "tqdm": "tqdm", "matplotlib": "matplotlib"}
EXIT_MISSING_EXTRA = 2


def missing_app_modules() -> list[str]:
    """The app extra's distributions that this environment cannot import (found without importing them)."""
    return [dist for module, dist in APP_EXTRA.items() if importlib.util.find_spec(module) is None]


def main(argv: list[str] | None = None) -> int:
    missing = missing_app_modules()
    if missing:
        print(f"decafa-fast: the command line is part of the app extra, which is not installed (missing: "
              f"{', '.join(missing)}); install it with: pip install \"decafa-fast[app]\"", file=sys.stderr)
        return EXIT_MISSING_EXTRA
    from .app.cli import main as app_main

    return app_main(argv)


if __name__ == "__main__":
    sys.exit(main())
