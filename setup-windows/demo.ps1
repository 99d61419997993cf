# Windows equivalent of `make demo`: the full pipeline on the embedded demo, on CPU.
$ErrorActionPreference = "Stop"
Set-Location (Join-Path $PSScriptRoot "..")
if (-not (Test-Path ".venv\.installed")) { & (Join-Path $PSScriptRoot "setup.ps1") }
$py = ".venv\Scripts\python"
$env:TOKENIZERS_PARALLELISM = "false"
& $py -m common.demo; if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
& $py part1_train_topk_sae.py --out checkpoints/part1_sae; if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
& $py part2_train_residual_nfm.py --sae checkpoints/part1_sae --out checkpoints/part2_nfm; if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
& $py part3_train_secondary_sae.py --nfm checkpoints/part2_nfm --out checkpoints/part3_secondary_sae; if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
& $py -m common.summary checkpoints/part1_sae checkpoints/part2_nfm checkpoints/part3_secondary_sae
