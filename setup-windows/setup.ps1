# Create .venv and install the pinned requirements (CPU torch). For a CUDA build, first run:
#   .venv\Scripts\python -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126
$ErrorActionPreference = "Stop"
Set-Location (Join-Path $PSScriptRoot "..")
if (-not (Test-Path ".venv\Scripts\python.exe")) { python -m venv .venv }
& .venv\Scripts\python -m pip install -q --disable-pip-version-check -r requirements.txt
if ($LASTEXITCODE -ne 0) { throw "pip install failed" }
New-Item -ItemType File -Force ".venv\.installed" | Out-Null
Write-Host "ready: .venv"
