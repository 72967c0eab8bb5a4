#!/usr/bin/env python3
"""Real Python gRPC clients against a llama-cluster gRPC server: server
reflection through grpcio-reflection (it speaks grpc.reflection.v1alpha),
grpc.health.v1 through grpcio-health-checking, and a typed client compiled
from the .proto files with grpcio-tools (stubs generated into STUB_DIR at
run time), streaming Inference.

usage: grpc_clients.py PROTO_DIR STUB_DIR ADDR SERVICE PROMPT MAX_TOKENS
SERVICE is llamacluster.v1.Worker or llamacluster.v1.Coordinator.
Prints one JSON object.
"""
import json
import sys

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_tools import protoc

TIMEOUT = 60


def reflect(channel, service):
    db = ProtoReflectionDescriptorDatabase(channel)
    services = sorted(db.get_services())
    pool = DescriptorPool(db)
    svc = pool.FindServiceByName(service)
    methods = {
        m.name: {
            "input": m.input_type.full_name,
            "output": m.output_type.full_name,
            "fields": [f.name for f in m.input_type.fields],
        }
        for m in svc.methods
    }
    return {"services": services, "methods": methods}


def health(channel, service):
    stub = health_pb2_grpc.HealthStub(channel)
    r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


def typed_inference(proto_dir, stub_dir, channel, service, prompt, max_tokens):
    rc = protoc.main([
        "grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={stub_dir}",
        f"--grpc_python_out={stub_dir}",
        "llamacluster/v1/worker.proto", "llamacluster/v1/coordinator.proto",
    ])
    if rc != 0:
        raise SystemExit(f"protoc failed: {rc}")
    sys.path.insert(0, stub_dir)
    from llamacluster.v1 import coordinator_pb2_grpc, worker_pb2, worker_pb2_grpc

    stub = (worker_pb2_grpc.WorkerStub(channel) if service.endswith("Worker")
            else coordinator_pb2_grpc.CoordinatorStub(channel))
    req = worker_pb2.InferenceRequest(prompt=prompt, max_tokens=max_tokens)
    text, chunks, stats = "", 0, None
    for m in stub.Inference(req, timeout=TIMEOUT):
        kind = m.WhichOneof("event")
        if kind == "chunk":
            text += m.chunk.text
            chunks += 1
        elif kind == "stats":
            stats = {"prompt_tokens": m.stats.prompt_tokens,
                     "generated_tokens": m.stats.generated_tokens,
                     "finish_reason": m.stats.finish_reason,
                     "route": list(m.stats.route)}
    return {"text": text, "chunks": chunks, "stats": stats}


def main():
    proto_dir, stub_dir, addr, service, prompt, max_tokens = sys.argv[1:7]
    out = {}
    with grpc.insecure_channel(addr) as channel:
        out["reflection"] = reflect(channel, service)
        out["health"] = {"": health(channel, ""), service: health(channel, service)}
        out["inference"] = typed_inference(proto_dir, stub_dir, channel, service, prompt,
                                           int(max_tokens))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
