"""stylekit: neural style transfer (Gatys et al.) as everyday software.

The one entry point is `stylize(request, progress=callback) -> Result`; everything else is a shell.
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from .errors import Cancelled, StylekitError
from .request import Progress, Result, StyleOptions, StyleRequest

if TYPE_CHECKING:  # type checkers and editors see the signatures that __getattr__ imports lazily
    from .engine import stylize, stylize_batch

__all__ = ["Cancelled", "Progress", "Result", "StyleOptions", "StyleRequest", "StylekitError",
           "__version__", "stylize", "stylize_batch"]


def __getattr__(name: str):
    """`stylize` on first use: importing torch takes seconds, which `stylekit --help` should not."""
    if name in ("stylize", "stylize_batch"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'stylekit' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazy names too, so completion in a REPL or notebook offers `stylize`."""
    return sorted({*globals(), *__all__})
