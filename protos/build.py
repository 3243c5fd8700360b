"""Regenerate the Python stubs from `protos/serving.proto`: `python -m protos.build`.

Run from the repository root; it writes `protos/serving_pb2.py`, `.pyi` and `serving_pb2_grpc.py`
(imported as `protos.serving_pb2`). The generated files are checked in and never edited by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    args = [
        "protoc",
        f"-I{ROOT}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        str(ROOT / "protos" / "serving.proto"),
    ]
    return protoc.main(args)


if __name__ == "__main__":
    sys.exit(main())
