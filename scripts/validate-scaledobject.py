#!/usr/bin/env python3
"""Validates a KEDA ScaledObject against KEDA's CRD schema.

The schema comes from `cloudcoil-models-keda` (PyPI): pydantic models
generated from KEDA 2.16's CRDs. Unknown fields are refused, as a strict
Kubernetes validation would. Also checks what the README promises: the
scale target is the baton StatefulSet, the maximum is no higher than the
input partitions (BATON_INPUT_PARTITIONS, 6 by default as in the README), and
the scale-in stabilisation outlasts a restore.

    validate-scaledobject.py SCALEDOBJECT.yaml STATEFULSET.yaml
"""

import json
import os
import sys

import jsonschema
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject


def strict(schema):
    """Refuses properties the CRD does not define, at every level."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema:
            schema.setdefault("additionalProperties", False)
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for value in schema:
            strict(value)
    return schema


def main(scaled_path, statefulset_path):
    with open(scaled_path) as handle:
        scaled = yaml.safe_load(handle)
    with open(statefulset_path) as handle:
        statefulset = yaml.safe_load(handle)
    schema = strict(ScaledObject.model_json_schema(by_alias=True))
    errors = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(scaled), key=lambda e: list(e.path)
    )
    for error in errors:
        print(f"{scaled_path}: {'/'.join(map(str, error.path))}: {error.message}")
    # The models' own validation too (types, enums, required fields).
    ScaledObject.model_validate(scaled)
    problems = [str(e) for e in errors]
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    if (target.get("kind"), target.get("name")) != ("StatefulSet", statefulset["metadata"]["name"]):
        problems.append(f"scaleTargetRef {target} is not the StatefulSet {statefulset['metadata']['name']}")
    partitions = int(os.environ.get("BATON_INPUT_PARTITIONS", "6"))
    if spec["maxReplicaCount"] > partitions:
        problems.append(f"maxReplicaCount {spec['maxReplicaCount']} exceeds the {partitions} input partitions")
    down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    grace = statefulset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    if down["stabilizationWindowSeconds"] < 2 * grace:
        problems.append("scale-in stabilisation shorter than two shutdowns")
    for problem in problems:
        print(f"{scaled_path}: {problem}")
    if not problems:
        print(f"{scaled_path}: valid against KEDA's ScaledObject schema ({len(json.dumps(schema))} bytes of schema)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
