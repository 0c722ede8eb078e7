"""Render every Kubernetes overlay into deploy/k8s/rendered/<overlay>.yaml.

The rendered files are committed: they can be applied where no kustomize is at hand
(`kubectl apply -f deploy/k8s/rendered/cpu.yaml`), and tests check and validate them on
machines without kubectl. tests/test_deploy.py fails when they are out of date.

    python scripts/render_k8s.py           # rewrite them
    python scripts/render_k8s.py --check   # exit 1 when one would change
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = ROOT / "deploy" / "k8s" / "overlays"
RENDERED = ROOT / "deploy" / "k8s" / "rendered"
RENDER_TIMEOUT_S = 60


def header(overlay: str) -> str:
    return (f"# Rendered from deploy/k8s/overlays/{overlay} by scripts/render_k8s.py; do not edit.\n"
            f"# Apply with: kubectl apply -f deploy/k8s/rendered/{overlay}.yaml\n")


def render(overlay: Path, kubectl: str) -> str:
    result = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True,
                            check=True, timeout=RENDER_TIMEOUT_S)
    return header(overlay.name) + result.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report files that would change")
    args = parser.parse_args(argv)
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        print("kubectl (with its built-in kustomize) is needed to render the overlays", file=sys.stderr)
        return 2
    stale = []
    RENDERED.mkdir(exist_ok=True)
    for overlay in sorted(p for p in OVERLAYS.iterdir() if (p / "kustomization.yaml").is_file()):
        target = RENDERED / f"{overlay.name}.yaml"
        text = render(overlay, kubectl)
        if target.is_file() and target.read_text() == text:
            continue
        stale.append(target.relative_to(ROOT))
        if not args.check:
            target.write_text(text)
    verb = "out of date" if args.check else "rewritten"
    print(f"{verb}: {', '.join(map(str, stale))}" if stale else "rendered manifests are current")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
