"""edgebuild: declarative, reproducible, measured compression builds for edge AI.

Importing this package loads no heavy library (torch, openvino, nncf, mlflow): they are
imported inside the functions that need them, so the CLI, --help and config errors stay fast.
"""

from edgebuild.errors import EdgebuildError

__version__ = "0.1.0"
__all__ = ["EdgebuildError", "__version__"]
