# Windows equivalent of `make test`.
$ErrorActionPreference = "Stop"
Set-Location (Join-Path $PSScriptRoot "..")
if (-not (Test-Path ".venv\.installed")) { & (Join-Path $PSScriptRoot "setup.ps1") }
& .venv\Scripts\python -m pip install -q --disable-pip-version-check -r requirements-test.txt
& .venv\Scripts\python -m pytest -q tests
exit $LASTEXITCODE
