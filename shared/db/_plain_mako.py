"""Mako's plain error pages, loaded before Alembic loads Mako.

Alembic renders new revision files with Mako, and Mako's own error pages highlight code with Pygments
whenever Pygments is installed (pytest brings it along). A service never renders either, yet importing
Pygments cost every service about 4.5 MB of idle memory. Importing Mako while Pygments is hidden gives
it the plain fallback it uses on an install without Pygments; Pygments stays importable afterwards.
"""

from __future__ import annotations

import sys

_hide = "pygments" not in sys.modules and "mako.exceptions" not in sys.modules
if _hide:
    sys.modules["pygments"] = None  # type: ignore[assignment]  # None makes `import pygments` fail
try:
    import mako.exceptions  # type: ignore[import-untyped]  # noqa: F401  # picks its highlighting once, at import
finally:
    if _hide:
        del sys.modules["pygments"]
