"""Triage of a compute-sanitizer racecheck log: every reported hazard must be between two source lines
marked `racecheck FP` (a report triaged as the tool's false positive in csrc/mla/NOTES.md, with the
evidence there); any other hazard fails. Prints one line per distinct site pair.

    python3 ci/racecheck_triage.py RACECHECK_LOG     (exit 1 on an untriaged hazard)
"""
import re
import sys
from pathlib import Path

SITE = re.compile(r"(Write|Read) access at .* in ([\w./-]+):(\d+)")
ROOT = Path(__file__).resolve().parents[1] / "csrc"


def marked(file: str, line: int) -> bool:
    for path in ROOT.rglob(Path(file).name):
        lines = path.read_text().splitlines()
        return 0 < line <= len(lines) and "racecheck FP" in lines[line - 1]
    return False


def main(log: str) -> int:
    sites, pending, bad = {}, None, 0
    for text in Path(log).read_text().splitlines():
        m = SITE.search(text)
        if not m:
            continue
        site = (m.group(2), int(m.group(3)))
        if pending is None:
            pending = site
            continue
        pair, pending = (pending, site), None
        count = re.search(r"\[(\d+) hazards\]", text)
        sites[pair] = sites.get(pair, 0) + (int(count.group(1)) if count else 1)
    for (a, b), n in sorted(sites.items()):
        ok = marked(*a) and marked(*b)
        bad += not ok
        print(f"{'triaged' if ok else 'UNTRIAGED'}: {a[0]}:{a[1]} vs {b[0]}:{b[1]} ({n} hazards)")
    if not sites:  # a report whose hazards name no source lines (no -lineinfo, another format): not triaged
        print("racecheck triage: no hazard sites with file:line found in the log; nothing can be triaged")
        return 1
    print(f"racecheck triage: {len(sites)} site pairs, {bad} untriaged")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
