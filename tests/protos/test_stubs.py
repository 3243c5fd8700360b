"""The checked-in stubs are exactly what `python -m protos.build` generates from serving.proto."""

from __future__ import annotations

import shutil
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[2]
GENERATED = ["serving_pb2.py", "serving_pb2.pyi", "serving_pb2_grpc.py"]


def test_stubs_are_regenerated_not_edited(tmp_path):
    (tmp_path / "protos").mkdir()
    shutil.copy(REPO / "protos" / "serving.proto", tmp_path / "protos")
    rc = protoc.main(
        [
            "protoc",
            f"-I{tmp_path}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(tmp_path / "protos" / "serving.proto"),
        ]
    )
    assert rc == 0
    for name in GENERATED:
        assert (tmp_path / "protos" / name).read_text() == (REPO / "protos" / name).read_text(), (
            f"protos/{name} differs from the generated one: run `python -m protos.build`"
        )


def test_every_rpc_and_field_is_documented():
    lines = (REPO / "protos" / "serving.proto").read_text().splitlines()
    for i, line in enumerate(lines):
        s = line.strip()
        is_field = s.endswith(";") and "=" in s and not s.startswith(("syntax", "package", "//"))
        if s.startswith("rpc ") or is_field:
            assert lines[i - 1].strip().startswith("//"), f"serving.proto:{i + 1} lacks a doc comment: {s}"
