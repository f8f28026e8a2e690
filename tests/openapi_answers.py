"""Checks real answers of the proxy against its own OpenAPI document.

Usage: python openapi_answers.py DOCUMENT.json CASES.json
CASES is a list of {"method", "path" (the document's template), "status", "body"}.
Each answer's status must be listed for that operation, and its JSON body must
validate against the schema documented for that status (JSON Schema 2020-12,
as OpenAPI 3.1 uses). Prints every mismatch; exit status 1 when there is one.
"""

import json
import sys

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

DOC_URI = "urn:flowise-proxy:openapi"


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        doc = json.load(f)
    with open(sys.argv[2], encoding="utf-8") as f:
        cases = json.load(f)
    registry = Registry().with_resource(
        DOC_URI, Resource.from_contents(doc, default_specification=DRAFT202012)
    )
    failures = []
    for case in cases:
        where = f'{case["method"]} {case["path"]} -> {case["status"]}'
        op = doc["paths"].get(case["path"], {}).get(case["method"].lower())
        if op is None:
            failures.append(f"{where}: operation not documented")
            continue
        response = op["responses"].get(str(case["status"]))
        if response is None:
            failures.append(f"{where}: status not documented (has {sorted(op['responses'])})")
            continue
        schema = response.get("content", {}).get("application/json", {}).get("schema")
        if schema is None:
            failures.append(f"{where}: no JSON schema documented")
            continue
        # Local references point into the document.
        schema = json.loads(json.dumps(schema).replace('"#/', f'"{DOC_URI}#/'))
        validator = Draft202012Validator(schema, registry=registry)
        for error in validator.iter_errors(case["body"]):
            path = "/".join(str(p) for p in error.absolute_path)
            failures.append(f"{where}: at '{path}': {error.message}")
    for f in failures:
        print(f)
    print(f"{len(cases)} answers checked, {len(failures)} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
