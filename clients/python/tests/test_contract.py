"""The contract: generated code is fresh, and proto/diffstack/v1 follows the buf style guide."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[3]
PROTO_ROOT = ROOT / "proto"
GENERATED = ROOT / "clients/python/src/diffstack_client/_generated"


def load_gen_proto() -> Any:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts/gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_proto"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh() -> None:
    stale = load_gen_proto().stale_files(GENERATED)
    assert not stale, (
        f"generated code is stale: {stale}; run `python scripts/gen_proto.py` "
        "(with grpcio-tools and mypy-protobuf as pinned in requirements-dev.txt)"
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[descriptor_pb2.FileDescriptorProto]:
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("descriptors") / "set.pb"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "diffstack/v1").glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    arguments = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", "--include_source_info"]
    assert protoc.main([*arguments, f"--descriptor_set_out={out}", *protos]) == 0
    return list(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file)


def _elements(file: descriptor_pb2.FileDescriptorProto) -> list[tuple[tuple[int, ...], str]]:
    """(source path, name) of every message, field, oneof, enum, enum value, service and method."""
    found: list[tuple[tuple[int, ...], str]] = []

    def enum(path: tuple[int, ...], e: descriptor_pb2.EnumDescriptorProto) -> None:
        found.append((path, e.name))
        found.extend(((*path, 2, i), f"{e.name}.{v.name}") for i, v in enumerate(e.value))

    def message(path: tuple[int, ...], m: descriptor_pb2.DescriptorProto) -> None:
        found.append((path, m.name))
        found.extend(((*path, 2, i), f"{m.name}.{f.name}") for i, f in enumerate(m.field))
        real_oneofs = [i for i, o in enumerate(m.oneof_decl) if not o.name.startswith("_")]
        found.extend(((*path, 8, i), f"{m.name}.{m.oneof_decl[i].name}") for i in real_oneofs)
        for i, nested in enumerate(m.nested_type):
            if not nested.options.map_entry:
                message((*path, 3, i), nested)
        for i, e in enumerate(m.enum_type):
            enum((*path, 4, i), e)

    for i, m in enumerate(file.message_type):
        message((4, i), m)
    for i, e in enumerate(file.enum_type):
        enum((5, i), e)
    for i, s in enumerate(file.service):
        found.append(((6, i), s.name))
        found.extend(((6, i, 2, j), f"{s.name}.{m.name}") for j, m in enumerate(s.method))
    return found


def test_every_element_has_a_full_sentence_comment(files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    missing = []
    for file in files:
        comments = {tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location}
        elements = _elements(file)
        assert len(elements) > 10
        for path, name in elements:
            comment = comments.get(path, "")
            if not comment or not comment[0].isupper() or not comment.endswith("."):
                missing.append(f"{file.name}: {name}")
    assert not missing, missing


def test_buf_style_names(files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    for file in files:
        assert file.package == "diffstack.v1"
        assert file.name.startswith("diffstack/v1/")
        for enum in [*file.enum_type, *(e for m in file.message_type for e in m.enum_type)]:
            prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
            assert enum.value[0].number == 0 and enum.value[0].name == f"{prefix}UNSPECIFIED"
            assert all(v.name.startswith(prefix) for v in enum.value), enum.name
        for service in file.service:
            assert service.name.endswith("Service")
            for method in service.method:
                assert method.input_type == f".diffstack.v1.{method.name}Request"
                assert method.output_type == f".diffstack.v1.{method.name}Response"


def test_generated_modules_import_inside_the_client_package() -> None:
    from diffstack_client.v1 import diagnostics_pb2, generation_pb2, types_pb2

    assert generation_pb2.DESCRIPTOR.name == "diffstack/v1/generation.proto"
    assert {d.name for d in generation_pb2.DESCRIPTOR.dependencies} == {types_pb2.DESCRIPTOR.name}
    assert set(diagnostics_pb2.DESCRIPTOR.services_by_name) == {"DiagnosticsService"}
