# Download OpenLLaMA-3B (v1) into a local folder with huggingface_hub, then pass it as --model.
#   powershell -File setup-windows\download_openllama3b.ps1 [-Target models\open_llama_3b]
param([string]$Target = "models\open_llama_3b")
$ErrorActionPreference = "Stop"
Set-Location (Join-Path $PSScriptRoot "..")
if (-not (Test-Path ".venv\.installed")) { & (Join-Path $PSScriptRoot "setup.ps1") }
$code = @"
from huggingface_hub import snapshot_download
p = snapshot_download(repo_id='openlm-research/open_llama_3b', local_dir=r'$Target',
                      allow_patterns=['*.json', '*.safetensors', '*.bin', '*.model', '*.txt'])
print(p)
"@
& .venv\Scripts\python -c $code
if ($LASTEXITCODE -ne 0) { throw "download failed" }
Get-ChildItem $Target | Select-Object Name, Length | Format-Table
Write-Host "now run: .venv\Scripts\python part1_train_topk_sae.py --preset paper --model $Target --out checkpoints\paper\part1_sae"
