"""Cheap sensitivity proxies: replay recorded DiT calls instead of generating images.

A full evaluation generates every prompt (``steps`` DiT calls each, twice with true CFG) and
scores the images.  The proxies instead replay a few DiT calls of the BF16 denoising trajectory:

* ``capture``: while BF16 images are generated, a forward pre-hook on the transformer records
  its inputs (positional and keyword: latents, timestep, text embeddings, masks, shapes: whatever
  the architecture takes) and a forward hook its output, for a handful of (prompt, step) samples
  spread over prompts and steps.  Nothing architecture-specific: the replay is
  ``transformer(*args, **kwargs)``.  Cached under ``$LAYERSCAN_CACHE/proxy/`` as safetensors plus
  JSON (no pickles), keyed by the evaluation settings.
* ``scores``: layer-local (one BF16 replay per sample with a hook on every quantizable Linear
  that also runs that layer in FP8 on the same input: the relative error ``|y8 - y|^2 / |y|^2``
  of every layer at once, no error propagation; about two DiT calls per sample) and end-to-end
  (the DiT with one configuration applied, replayed on the samples; the relative error of its
  output against the recorded BF16 output; one DiT call per sample and configuration).

Costs are counted in DiT calls and reported in full-evaluation equivalents: one full evaluation
is ``calls_per_image x images`` DiT calls (measured while recording, so true CFG counts double).
"""
