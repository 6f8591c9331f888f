"""The math layer imports no orchestration packages (style guide Sec. 8.3)."""

import subprocess
import sys

FORBIDDEN = ("ray", "mlflow", "fsspec", "pydantic", "s3fs", "typer")


def test_math_modules_import_no_orchestration_packages():
    code = (
        "import sys, cmflow.diffusion, cmflow.models; "
        f"bad = sorted(m for m in {FORBIDDEN!r} if m in sys.modules); "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported: {out.stdout.strip()}"
