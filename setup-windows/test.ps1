# Windows equivalent of `make test`.
$ErrorActionPreference = "Stop"
Set-Location (Join-Path $PSScriptRoot "..")
if (-not (Test-Path ".venv\.installed")) { & (Join-Path $PSScriptRoot "setup.ps1") }
& .venv\Scripts\python -m pytest -q tests
exit $LASTEXITCODE
