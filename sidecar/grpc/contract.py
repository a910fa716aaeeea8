"""The gRPC API as the documentation shows it: the services this sidecar serves, their
methods and the messages they take and answer, read from the compiled descriptors of
proto/ (the source of truth), so the page at /docs shows the gRPC side next to the HTTP
one. Server reflection (grpcurl, Postman) serves the same descriptors."""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor

from sidecar.grpc.gen.aforo.sidecar.v1 import sidecar_pb2
from sidecar.grpc.gen.envoy.service.ratelimit.v3 import rls_pb2

_FILES: tuple[FileDescriptor, ...] = (sidecar_pb2.DESCRIPTOR, rls_pb2.DESCRIPTOR)


def _type(field: FieldDescriptor) -> str:
    if field.message_type is not None:
        entry = field.message_type
        if entry.GetOptions().map_entry:
            key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
            return f"map<{_type(key)}, {_type(value)}>"
        return entry.full_name
    if field.enum_type is not None:
        return field.enum_type.full_name
    return {
        FieldDescriptor.TYPE_STRING: "string",
        FieldDescriptor.TYPE_BOOL: "bool",
        FieldDescriptor.TYPE_INT32: "int32",
        FieldDescriptor.TYPE_INT64: "int64",
        FieldDescriptor.TYPE_UINT32: "uint32",
        FieldDescriptor.TYPE_UINT64: "uint64",
        FieldDescriptor.TYPE_DOUBLE: "double",
        FieldDescriptor.TYPE_FLOAT: "float",
        FieldDescriptor.TYPE_BYTES: "bytes",
        FieldDescriptor.TYPE_SINT64: "sint64",
        FieldDescriptor.TYPE_SINT32: "sint32",
    }.get(field.type, f"type {field.type}")


def _message(descriptor: Descriptor, into: dict[str, Any]) -> None:
    if descriptor.full_name in into or descriptor.GetOptions().map_entry:
        return
    fields = []
    for field in descriptor.fields:
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        repeated = field.is_repeated and not is_map
        number, kind = field.number, _type(field)
        fields.append({"name": field.name, "number": number, "type": kind, "repeated": repeated})
    into[descriptor.full_name] = fields
    for field in descriptor.fields:
        if field.message_type is not None:
            _message(field.message_type, into)


def describe() -> dict[str, Any]:
    """{"services": [{"name", "file", "methods": [...]}], "messages": {name: [field]}}."""
    services = []
    messages: dict[str, Any] = {}
    for file in _FILES:
        for service in file.services_by_name.values():
            methods = []
            for method in service.methods:
                methods.append(
                    {
                        "name": method.name,
                        "input": method.input_type.full_name,
                        "output": method.output_type.full_name,
                        "client_streaming": method.client_streaming,
                        "server_streaming": method.server_streaming,
                    }
                )
                _message(method.input_type, messages)
                _message(method.output_type, messages)
            services.append({"name": service.full_name, "file": f"proto/{file.name}", "methods": methods})
    return {"services": services, "messages": messages}
