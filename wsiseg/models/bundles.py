"""Model bundles: a folder (or a .zip of one) with `manifest.json` and safetensors weights.

CONTRACT (shared by the SAM segmentor, the prompters, the converters and the CLI):

manifest.json
    {
      "format": "wsiseg-bundle/1",
      "name": "pannuke123-vit_b", "version": "1.0", "description": "...",
      "mpp": 0.25,                      # micrometres per pixel the models were trained at
      "input_size": 256,                # tile size in px the segmentor wants (null: any)
      "normalisation": {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]},
      "k_negatives": 0,                 # negatives per prompt at inference
      "nms_radius_px": 12,              # point NMS radius for the prompter's points
      "max_nucleus_diameter_px": 64,    # sets the tile halo
      "classes": [{"id": 0, "name": "Neoplastic", "color": [255, 0, 0]}, ...],
      "components": {
        "prompter":  {"architecture": "dpa_p2pnet", "config": {...},
                      "weights": {"file": "prompter.safetensors", "sha256": "<hex>"}},
        "segmentor": {"architecture": "sam", "config": {"variant": "vit_b", ...},
                      "weights": {"file": "segmentor.safetensors", "sha256": "<hex>"}}
      }
    }
  A bundle may have either component or both.  Architectures: "sam", "dpa_p2pnet",
  "unet_prompter".

Python API
    open_bundle(path) -> Bundle           # folder or .zip; validates manifest, reads no weights
    Bundle.path, Bundle.manifest (Manifest), Bundle.has(role)
    Bundle.load_weights(role) -> dict[str, torch.Tensor]   # verifies sha256 first
    Manifest fields: name, version, description, mpp, input_size, normalisation (mean, std),
        k_negatives, nms_radius_px, max_nucleus_diameter_px, classes (tuple[NucleusClass, ...]),
        components: dict[str, Component]; Component(architecture, config: dict, file, sha256)
    write_bundle(out_dir, manifest_dict_without_sha, {role: state_dict}) -> Bundle
        # writes safetensors per role, fills in file names and sha256, writes manifest.json
    BundleError(ValueError): every problem, message names the bundle path and what is wrong.

Model families build themselves from a bundle:
    wsiseg.models.sam.SamSegmentor.from_bundle(bundle, *, input_size=None, device="cpu", k_negatives=None)
    wsiseg.models.prompters.PointPrompter.from_bundle(bundle, *, device="cpu")
    wsiseg.models.prompters.ProbabilityPrompter.from_bundle(bundle, *, device="cpu", selection=..., ...)
"""

from __future__ import annotations
