"""`qtale experiment RECIPE.yaml`: QTALE vs D-LLM vs quantization-only, end to end, from a recipe.

Stages (each writes its artifacts atomically under the run folder `runs/<recipe name>/` and is skipped
when its output exists; training itself resumes through train's --resume):

  train        routers for every method (qtale, dllm) with the same data, steps, seed (and LoRA if
               used); with LoRA also the all-layers reference (LoRA trained with target ratio 1.0,
               lambda1 = lambda2 = 0). Without LoRA the all-layers reference is the base model itself.
  calibrate    theta for the recipe's ratios on every trained (unquantized) checkpoint
  quantize     every trained checkpoint and the all-layers reference, in every format of the recipe
  recalibrate  theta again on every quantized checkpoint (post-training ratio control; the same for
               QTALE and D-LLM, so both are compared at the same realized ratio); the drift of the
               unquantized thetas on the quantized model is recorded
  eval         every configuration: dense all-layers (fp), quant-only all-layers per format,
               D-LLM + quant and QTALE + quant at each ratio: per-task accuracy with per-item scores,
               realized ratio, FLOPs fraction, perplexity and KL to the dense fp model
  report       docs/results.json, docs/results.md, docs/results.png (see docs/experiment.md)

On request (--only): `keep` commits finished training runs, `ship` copies the QTALE routers into the
package. Modules: recipe (schema), layout (run folder, configurations), stages, report, ship,
command (the command line).
"""
from .command import ExperimentOptions, run_experiment
from .layout import Run, configurations
from .recipe import load_recipe
from .report import (README_BEGIN, README_END, SCHEMA, gold_yes_rate, paired, paired_robust, pooled, render_markdown,
                     render_readme_block, update_readme, yes_rate)
from .ship import recommended_ratio, stage_keep, stage_ship
from .stages import ON_REQUEST, STAGES

__all__ = ["README_BEGIN", "README_END", "SCHEMA", "ON_REQUEST", "STAGES", "ExperimentOptions", "Run",
           "configurations", "gold_yes_rate", "load_recipe", "paired", "paired_robust", "pooled", "recommended_ratio", "render_markdown",
           "render_readme_block", "run_experiment", "stage_keep", "stage_ship", "update_readme", "yes_rate"]
