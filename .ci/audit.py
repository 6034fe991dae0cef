"""`make audit`: known vulnerabilities in the locked dependencies, with pip-audit.

The locked set is exactly what `make venv` installed (``pip freeze`` of .venv, accountd itself
excluded); pip-audit checks each pinned version against the PyPI advisory data without
installing anything (``--no-deps --disable-pip``).

Exit status: 0 when nothing vulnerable was found, 1 when something was (listed), 2 when
pip-audit itself is missing or broken. When the vulnerability service cannot be reached (no
network, or a PyPI mirror that does not serve the per-version JSON pip-audit reads, which it
reports as "not found" and skips), the packages were NOT checked: that is said loudly on
stderr and the exit status stays 0, so an offline CI run does not fail for it. Set
AUDIT_STRICT=1 to make it fail instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

UNREACHABLE_HINTS = (
    "ConnectionError",
    "Connection error",
    "Max retries exceeded",
    "Name or service not known",
    "Temporary failure in name resolution",
    "timed out",
    "ServiceError",
    "HTTPError",
)


def main() -> int:
    python = sys.executable
    # Every command line below is our own constant; nothing comes from input.
    probe = [python, "-m", "pip_audit", "--version"]
    if subprocess.run(probe, capture_output=True).returncode:  # noqa: S603
        print(
            "audit: pip-audit is not installed in this environment (it comes with the test "
            "extra: `make venv`)",
            file=sys.stderr,
        )
        return 2
    frozen = subprocess.run(  # noqa: S603
        [python, "-m", "pip", "freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pins = [line for line in frozen.splitlines() if "==" in line and not line.startswith("#")]
    with tempfile.TemporaryDirectory() as tmp:
        lock = Path(tmp) / "requirements.lock"
        lock.write_text("\n".join(pins) + "\n")
        report = Path(tmp) / "audit.json"
        proc = subprocess.run(  # noqa: S603
            [
                python,
                "-m",
                "pip_audit",
                "--requirement",
                str(lock),
                "--no-deps",
                "--disable-pip",
                "--progress-spinner",
                "off",
                "--format",
                "json",
                "--output",
                str(report),
            ],
            capture_output=True,
            text=True,
        )
        text = report.read_text() if report.exists() else ""
    if not text:
        if any(hint in proc.stderr for hint in UNREACHABLE_HINTS):
            return unreachable(len(pins), proc.stderr.strip().splitlines()[-1])
        print(f"audit: pip-audit failed (exit {proc.returncode}):\n{proc.stderr}", file=sys.stderr)
        return 2
    deps = json.loads(text).get("dependencies", [])
    skipped = [d for d in deps if d.get("skip_reason")]
    checked = [d for d in deps if not d.get("skip_reason")]
    vulnerable = [d for d in checked if d.get("vulns")]
    for dep in vulnerable:
        for vuln in dep["vulns"]:
            fixed = ", ".join(vuln.get("fix_versions") or []) or "no fix yet"
            print(f"audit: {dep['name']} {dep['version']}: {vuln['id']} (fixed in {fixed})")
    if vulnerable:
        print(f"audit: {len(vulnerable)} vulnerable package(s)", file=sys.stderr)
        return 1
    if checked:
        print(f"audit: {len(checked)} locked package(s) checked, no known vulnerabilities")
    if skipped and not checked:
        return unreachable(len(pins), skipped[0]["skip_reason"])
    for dep in skipped:
        print(f"audit: NOT checked: {dep['name']}: {dep['skip_reason']}", file=sys.stderr)
    return 0


def unreachable(count: int, detail: str) -> int:
    print(
        f"audit: WARNING: the vulnerability service could not be reached; {count} locked "
        f"package(s) were NOT checked ({detail})",
        file=sys.stderr,
    )
    return 1 if os.environ.get("AUDIT_STRICT") == "1" else 0


if __name__ == "__main__":
    sys.exit(main())
