"""The checked-in gRPC code is what `make proto` generates from proto/."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("memupdate_pb2.py", "memupdate_pb2.pyi", "memupdate_pb2_grpc.py")


def test_generated_code_is_in_sync_with_the_proto(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(ROOT / "proto" / "memupdate" / "v1" / "memupdate.proto"),
        ],
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "memupdate" / "v1" / name).read_text()
        checked_in = (ROOT / "memupdate" / "v1" / name).read_text()
        assert fresh == checked_in, f"{name} is stale: run `make proto`"


def test_every_field_is_documented_in_the_proto():
    """Every message field carries a comment on its line or the line above, or a name that
    says what it is (ids and plain names)."""
    self_explaining = {
        "job_id",
        "knowledge_base",
        "name",
        "facts",
        "prompt",
        "target",
        "text",
        "jobs",
        "knowledge_bases",
        "versions",
        "version",
        "plan",
        "state",
        "phase",
        "rank",
        "sha256",
        "sequence",
        "kind",
        "message",
    }
    lines = (ROOT / "proto" / "memupdate" / "v1" / "memupdate.proto").read_text().splitlines()
    missing = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if (
            "=" in stripped
            and stripped.endswith(";")
            and not stripped.startswith(("//", "option", "syntax"))
        ):
            parts = stripped.split("=")[0].split()
            field = parts[-1] if parts else ""
            if stripped.isupper() or field.isupper():
                continue  # enum values
            documented = "//" in line or lines[i - 1].strip().startswith("//")
            if not documented and field not in self_explaining:
                missing.append(f"{i + 1}: {stripped}")
    assert not missing, "undocumented fields:\n" + "\n".join(missing)
