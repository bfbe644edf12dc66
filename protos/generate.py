"""Generate the Python stubs for the wire contract into a folder (used by `make protos` and a test).

The .proto lives at protos/connector/v1/ (package connector.v1), so protoc writes imports as
`from connector.v1 import ...`; the stubs live in the package `connector._proto`, so the one
import line in the gRPC stub is rewritten to the absolute package path. The Flight SQL
messages (protos/flight_sql.proto, messages only, no service) become flight_sql_pb2.py at
the top of the folder.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILE = "connector/v1/connector.proto"
FLIGHT_SQL_FILE = "flight_sql.proto"


def generate(out_dir: Path) -> None:
    """Write connector_pb2.py, connector_pb2_grpc.py and their .pyi stubs below out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plugins = str(Path(sys.executable).parent)
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={shutil.which('protoc-gen-mypy', path=plugins)}",
        f"--plugin=protoc-gen-mypy_grpc={shutil.which('protoc-gen-mypy_grpc', path=plugins)}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        str(PROTO_ROOT / PROTO_FILE),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed: see the message above")
    messages_only = [a for a in args[:-1] if "grpc" not in a]
    if protoc.main([*messages_only, str(PROTO_ROOT / FLIGHT_SQL_FILE)]) != 0:
        raise SystemExit("protoc failed on the Flight SQL messages: see the message above")
    package = out_dir / "connector" / "v1"
    for stub in package.glob("*_grpc.py*"):
        text = stub.read_text()
        stub.write_text(
            text.replace(
                "from connector.v1 import", "from connector._proto.connector.v1 import"
            ).replace(
                "import connector.v1.connector_pb2",
                "import connector._proto.connector.v1.connector_pb2",
            )
        )
    for folder in (out_dir / "connector", package):
        (folder / "__init__.py").touch()


if __name__ == "__main__":
    generate(Path(sys.argv[1]))
