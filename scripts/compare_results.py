"""Compare two ``results.json`` files of the same config, e.g. from two code versions.

    python scripts/compare_results.py OLD/results.json NEW/results.json

Every field must be equal except ``profile`` (timings); ``mode_cl_version`` is reported but not
required to match. Exits 0 when equal, 1 with the differing paths otherwise. Floats are compared
exactly (the engine promises bit-identical results for the same config, threads and machine).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

IGNORED = {"profile", "mode_cl_version"}


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Paths at which two JSON values differ (NaN equals NaN)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(old.keys() | new.keys()):
            if not path and key in IGNORED:
                continue
            if key not in old or key not in new:
                out.append(f"{path}.{key}: only in {'new' if key in new else 'old'}")
            else:
                out += differences(old[key], new[key], f"{path}.{key}" if path else key)
        return out
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return [f"{path}: length {len(old)} vs {len(new)}"]
        return [d for i, (a, b) in enumerate(zip(old, new, strict=True)) for d in differences(a, b, f"{path}[{i}]")]
    if isinstance(old, float) and isinstance(new, float) and math.isnan(old) and math.isnan(new):
        return []
    return [] if old == new else [f"{path}: {old!r} vs {new!r}"]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    old, new = (json.loads(Path(p).read_text()) for p in argv)
    found = differences(old, new)
    counted = sum(len(v) for v in old.get("losses", []))
    print(f"compared {argv[0]} and {argv[1]}: {counted} losses, {len(old.get('acc_matrix', []))} stages")
    print(f"versions: {old.get('mode_cl_version')} vs {new.get('mode_cl_version')}")
    if found:
        print(f"{len(found)} difference(s):")
        for line in found[:20]:
            print(f"  {line}")
        return 1
    print("identical (profile aside)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
