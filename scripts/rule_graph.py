"""Rule rule_graph: `snakemake --rulegraph` of this workflow under the job's config, drawn as a PNG."""

import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from histosynth.evaluation.rule_graph import plot_rule_graph
from histosynth.logs import log_to

log = log_to(snakemake.log[0])
snakefile = Path(snakemake.scriptdir).parent / "Snakefile"
with tempfile.NamedTemporaryFile("w", suffix=".yaml") as config:
    yaml.safe_dump(dict(snakemake.config), config)
    config.flush()
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(snakefile),
        "--configfile",
        config.name,
        "--rulegraph",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
if result.returncode:
    sys.exit(f"{' '.join(command)} failed:\n{result.stderr}")
Path(snakemake.output.dot).write_text(result.stdout)
log.info("rule graph: %s", plot_rule_graph(snakemake.output.dot, snakemake.output.png))
