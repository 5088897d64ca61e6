"""Real-image inversion: an image and its caption P -> the z_T (and guidance inputs) that regenerate it, so
that Prompt-to-Prompt can edit it (paper Sec. 4, "Real image editing"; its follow-ups).

    from p2p.core.inversion import invert, reconstruct
    inv = invert(pipe, "cat.jpg", "a cat sitting next to a mirror", method="null-text")
    inv.save("cat.safetensors")                     # invert once, edit many times: Inversion.load(...)
    z_0 = reconstruct(pipe, inv)                    # row 0 of every edit of `inv`
    run_edit(pipe, EditSettings(inv.prompt, targets=("a tiger sitting next to a mirror",)), inversion=inv)

All four methods start from DDIM inversion (Song et al. 2021; the authors' `ddim_loop`): from the image's
latent z*_0 = E(x), run the deterministic DDIM step backwards with the conditional branch only (w = 1),
eps predicted at the *next* timestep from the current latent:

    z*_t = sqrt(alpha_bar_t) (z*_t' - sqrt(1 - alpha_bar_t') eps) / sqrt(alpha_bar_t') + sqrt(1 - alpha_bar_t) eps,
    eps = eps_theta(z*_t', t, psi(P)),  t' = t - 1000 / N                       (models/ddim.py: invert_step)

giving the pivot trajectory z*_0, ..., z*_T. Sampling from z_T = z*_T retraces it closely at w = 1 but
drifts at w = 7.5, where guidance amplifies eps_c - eps_u. The methods differ in how they fix that:

  ddim             nothing: z_T only; uncond psi("") when editing (the paper's own real-image results).
  null-text        Mokady et al. 2023, the authors' `null_optimization`: for each step i (t = t_i), with
                   z_bar_T = z*_T, optimise the unconditional embedding phi_i (warm-started from phi_{i-1},
                   phi_{-1} = psi("")) by Adam with lr 1e-2 (1 - s/100), at most 10 iterations, until
                   || DDIM_w(z_bar_t, phi_i) - z*_{t'} ||^2 (mean) < 1e-5 + 2e-5 s; then z_bar_t' = DDIM_w(z_bar_t, phi_i).
                   s = 50 i / N is the step index on the authors' 50-step schedule (s = i for N = 50; their
                   `1 - i/100` would turn the learning rate negative past 100 steps).
  negative-prompt  Miyake et al. 2023: phi_i = psi(P) for every step, so eps_u = eps_c at the source and
                   w drops out of the source branch (it equals DDIM at w = 1). No optimisation.
  direct           Ju et al. 2023 (PnP inversion, "Direct Inversion"): uncond psi(""), and per step the
                   offset d_i = z*_{t'} - DDIM_w(z_bar_t), z_bar_t' = z*_{t'}; when editing, d_i is added to the
                   source row only, after its DDIM step and before local blending (their
                   `direct_inversion_p2p_guidance_diffusion_step`). The source retraces the pivot exactly.

The timesteps are the pipeline's (for SD v1 with steps_offset 1: 981, ..., 1, where the authors' null-text
notebook has 980, ..., 0). An `Inversion` holds what editing needs and round-trips through a .safetensors file
whose header carries the rest as JSON.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from models.checkpoint import aligned
from models.errors import MissingFileError, UserError
from models.sdxl import SizeConditioning

from p2p.files.images import encode_image, load_image

from .controller import Compose, Controller

METHODS = ("ddim", "null-text", "negative-prompt", "direct")
FORMAT = "p2p-inversion/1"
KEY = "p2p_inversion"  # the safetensors header entry with the JSON metadata


def fingerprint(pipe) -> list[float]:
    """Numbers that tell models apart: sum w and sum |w| of the UNet's first and last convolutions (float64).
    A guard against editing with another model; a fine-tune of the same model may pass it."""
    out = []
    for w in (pipe.unet.conv_in.weight, pipe.unet.conv_out.weight):
        w = w.detach().double()
        out += [float(w.sum()), float(w.abs().sum())]
    return out


def same_model(a: list[float], b: list[float]) -> bool:
    """Fingerprints equal up to the rounding of the weights to float16 or bfloat16 (each weight moves by at
    most 2^-9 of itself, so each sum by at most 2^-9 sum |w|)."""
    pairs = list(zip(a[0::2], a[1::2], b[0::2], b[1::2]))
    return len(a) == len(b) and all(abs(s - t) <= 4e-3 * max(m, n) and abs(m - n) <= 4e-3 * max(m, n)
                                    for s, m, t, n in pairs)


@dataclass
class Inversion:
    """What an edit of a real image needs, for one caption, method, number of steps and guidance scale."""

    z_T: torch.Tensor  # (1, 4, h, w): the latent sampling starts from
    prompt: str  # the caption P the image was inverted with: the edit's source prompt
    method: str  # one of METHODS
    steps: int  # N, the DDIM steps the inversion is valid for
    guidance: float  # w: the scale null-text / direct are made for, and the default scale of an edit
    image_size: tuple[int, int]  # (height, width) in pixels
    uncond: torch.Tensor | None = None  # null-text: (N, 77, width), one phi_i per step; negative-prompt: (1, 77, width)
    offsets: torch.Tensor | None = None  # direct: (N, 1, 4, h, w), added to the source row after step i
    z_0: torch.Tensor | None = None  # E(x), the latent of the image (what a reconstruction aims at)
    info: dict = field(default_factory=dict)  # timings, per-step losses, model fingerprint (JSON-able)

    # --- use ---------------------------------------------------------------------------------------

    def settle(self, settings):
        """EditSettings with this inversion's steps / guidance / size filled in; raises ValueError on
        settings an edit of this inversion cannot honour. The seed is unused (z_T is the inversion's)."""
        s, fix = settings, {}
        if s.prompt != self.prompt:
            raise UserError(f"the edit's source prompt {s.prompt!r} is not the caption the image was inverted with "
                            f"({self.prompt!r}): use that caption as the source prompt, or invert again with yours")
        for name, mine in (("steps", self.steps), ("height", self.image_size[0]), ("width", self.image_size[1])):
            value = getattr(s, name)
            if value is not None and value != mine:
                raise UserError(f"the inversion is made for {name}={mine}, the edit asks for {name}={value}: "
                                f"leave {name} unset or invert again with it")
            fix[name] = mine
        if s.guidance is not None and s.guidance != self.guidance and self.method in ("null-text", "direct"):
            raise UserError(f"a {self.method} inversion is made for guidance {self.guidance} and reconstructs only "
                            f"with it; the edit asks for {s.guidance}: leave guidance unset or invert again with it")
        fix["guidance"] = self.guidance if s.guidance is None else s.guidance
        if s.eta:
            raise UserError(f"an inverted image is edited with deterministic DDIM (eta 0), got eta={s.eta}")
        if s.negative_prompt and self.method != "ddim":
            raise UserError(f"a {self.method} inversion sets the unconditional branch itself; drop the negative "
                            "prompt (it only combines with --inversion ddim)")
        return replace(s, **fix)

    def sampling_inputs(self, pipe, negative_prompt: str = "") -> dict:
        """z_T, uncond and the controller for `Pipeline.denoise` on `pipe` (checked to be the inverting model):
        for a direct inversion, `SourceOffsets` (compose an edit after it); else None."""
        if tuple(self.z_T.shape) != pipe.latent_shape(*self.image_size):
            raise UserError(f"the inversion's z_T is {tuple(self.z_T.shape)} but this model's latent for "
                            f"{self.image_size[0]}x{self.image_size[1]} is {pipe.latent_shape(*self.image_size)}: "
                            "it was made with another model; invert the image again with this one")
        fp = self.info.get("model_fingerprint")
        if fp is not None and not same_model(fp, fingerprint(pipe)):
            raise UserError("the inversion was made with another model (its UNet weights differ): invert the image "
                            "again with this model")
        made = SizeConditioning(**{k: tuple(v) for k, v in self.info.get("size_conditioning", {}).items()})
        if not torch.equal(made.time_ids(*self.image_size, 1), pipe.size_conditioning.time_ids(*self.image_size, 1)):
            made, now = made.to_dict() or "of the image size", pipe.size_conditioning.to_dict() or "the image size"
            raise UserError(f"the inversion was made with SDXL size conditioning {made}, the edit asks for {now}: use "
                            "the same (--sdxl-original-size, --sdxl-crop, --sdxl-target-size) or invert again")
        if self.method == "null-text":
            uncond = self.uncond[:, None]  # (N, 1, 77, width): one embedding per step, shared by the prompts
        elif self.method == "negative-prompt":
            uncond = self.uncond
        else:
            uncond = pipe.encode_negative(negative_prompt)
        return {"z_T": self.z_T, "uncond": uncond,
                "controller": None if self.offsets is None else SourceOffsets(self.offsets)}

    # --- file -----------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """One .safetensors file: the tensors, and the rest as JSON under the header key "p2p_inversion"."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in
                   (("z_T", self.z_T), ("uncond", self.uncond), ("offsets", self.offsets), ("z_0", self.z_0))
                   if v is not None}
        meta = {"format": FORMAT, "prompt": self.prompt, "method": self.method, "steps": self.steps,
                "guidance": self.guidance, "image_size": list(self.image_size), "info": self.info}
        tmp = path.with_name(path.name + ".tmp")
        try:  # written whole under a temporary name, then renamed: an error or Ctrl-C leaves nothing
            save_file(tensors, str(tmp), metadata={KEY: json.dumps(meta)})
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Inversion:
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"no inversion file at {path} (write one with `p2p invert ... --out {path}`)")
        try:
            with safe_open(str(path), "pt") as f:
                header = (f.metadata() or {}).get(KEY)
                tensors = {k: aligned(f.get_tensor(k)) for k in f.keys()}  # as the weights: kernels round by address
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path} is not a readable .safetensors file ({e}); write it with `p2p invert`") from None
        if header is None:
            raise UserError(f"{path} is a safetensors file but not an inversion (no {KEY!r} metadata); "
                            "write one with `p2p invert`")
        broken = f"{path}: the inversion's header is broken"
        fix = "the file is damaged or was edited: invert the image again with `p2p invert`"
        try:
            meta = json.loads(header)
            fmt = meta.get("format")
        except (ValueError, AttributeError):
            raise UserError(f"{broken} (its {KEY!r} metadata is not a JSON object); {fix}") from None
        if fmt != FORMAT:
            raise UserError(f"{path} is an inversion of format {fmt!r}; this p2p reads {FORMAT!r}")
        try:
            inv = cls(tensors["z_T"], str(meta["prompt"]), meta["method"], int(meta["steps"]),
                      float(meta["guidance"]), tuple(int(s) for s in meta["image_size"]), tensors.get("uncond"),
                      tensors.get("offsets"), tensors.get("z_0"), dict(meta.get("info", {})))
        except KeyError as e:
            raise UserError(f"{broken} (it lacks {e.args[0]!r}); {fix}") from None
        except (TypeError, ValueError) as e:
            raise UserError(f"{broken} ({e}); {fix}") from None
        if inv.method not in METHODS:
            raise UserError(f"{broken} (unknown method {inv.method!r}); {fix}")
        return inv


# --- the methods ----------------------------------------------------------------------------------------

@torch.no_grad()
def ddim_inversion(pipe, z_0: torch.Tensor, cond: torch.Tensor, steps: int, progress: bool = True
                   ) -> list[torch.Tensor]:
    """The pivot trajectory [z*_0, z*_1, ..., z*_N] (z*_N = z_T), conditional branch only (w = 1)."""
    z = z_0.to(pipe.device, pipe.dtype)
    trajectory = [z]
    for t in tqdm(pipe.ddim.timesteps(steps)[::-1], disable=not progress, desc="DDIM inversion", leave=False):
        z = pipe.ddim.invert_step(pipe.predict(z, t, cond), t, z, steps)
        trajectory.append(z)
    return trajectory


def guided_eps(pipe, z, t, cond, uncond, guidance):
    eps_u, eps_c = pipe.predict(torch.cat([z, z]), t, torch.cat([uncond.to(z.dtype), cond])).chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def null_text_optimisation(pipe, trajectory, cond, uncond, steps, guidance, *, inner_steps=10, early_stop=1e-5,
                           lr=1e-2, progress=True) -> tuple[torch.Tensor, dict]:
    """phi_0..phi_{N-1} (N, 77, width) in float32, and per-step {final loss, iterations} (Mokady et al., Alg. 1)."""
    timesteps, ddim = pipe.ddim.timesteps(steps), pipe.ddim
    z, phi = trajectory[-1], uncond.float()
    phis, losses, iterations = [], [], []
    bar = tqdm(total=steps * inner_steps, disable=not progress, desc="null-text optimisation", leave=False)
    for i, t in enumerate(timesteps):
        target = trajectory[steps - i - 1].float()
        phi = phi.detach().clone().requires_grad_(True)
        s = i * 50 / steps  # the step index on the authors' 50-step schedule
        opt = torch.optim.Adam([phi], lr=lr * (1.0 - s / 100.0))
        with torch.no_grad():
            eps_c = pipe.predict(z, t, cond)
        loss_item, j = float("nan"), 0
        for j in range(inner_steps):
            with torch.enable_grad():
                eps_u = pipe.predict(z, t, phi.to(pipe.dtype))
                z_prev = ddim.step(eps_u + guidance * (eps_c - eps_u), t, z, steps)
                loss = F.mse_loss(z_prev.float(), target)
                opt.zero_grad()
                loss.backward()
                opt.step()
            loss_item = loss.item()
            if loss_item < early_stop + s * 2e-5:  # the authors' threshold grows with the step index
                break
        bar.update(inner_steps)
        phis.append(phi.detach()[0])
        losses.append(loss_item)
        iterations.append(j + 1 if inner_steps else 0)
        with torch.no_grad():  # eps_c of this step is already known: only the optimised branch runs again
            eps_u = pipe.predict(z, t, phis[-1][None].to(pipe.dtype))
            z = ddim.step(eps_u + guidance * (eps_c - eps_u), t, z, steps)
    bar.close()
    return torch.stack(phis).cpu(), {"losses": losses, "iterations": iterations}


@torch.no_grad()
def direct_offsets(pipe, trajectory, cond, uncond, steps, guidance) -> torch.Tensor:
    """d_i = z*_{t'} - DDIM_w(z_bar_t) along the pivot (Ju et al. 2023), (N, 1, 4, h, w) float32."""
    z, out = trajectory[-1], []
    for i, t in enumerate(pipe.ddim.timesteps(steps)):
        z_rec = pipe.ddim.step(guided_eps(pipe, z, t, cond, uncond, guidance), t, z, steps)
        d = trajectory[steps - i - 1] - z_rec
        out.append(d.float().cpu())
        z = z_rec + d
    return torch.stack(out)


def check_caption(tokenizer, prompt: str) -> None:
    n = tokenizer.count(prompt)
    if n > 77:
        raise UserError(f"the caption {prompt!r} is {n} tokens, more than the 77 the text encoder takes; shorten "
                        "it (an edit aligns its tokens, so it cannot run on a truncated caption)")


def invert(pipe, image: str | Path | Image.Image, prompt: str, method: str = "null-text", *, steps: int | None = None,
           guidance: float | None = None, inner_steps: int = 10, early_stop: float = 1e-5, lr: float = 1e-2,
           progress: bool = True) -> Inversion:
    """Invert a photo (a path or a PIL image, prepared by p2p.files.images.load_image) with its caption `prompt`.

    `steps` and `guidance` default to the model's (SD v1: 50 and 7.5); `inner_steps`, `early_stop` and `lr`
    are null-text's (the authors' 10, 1e-5 and 1e-2).
    """
    if method not in METHODS:
        raise UserError(f"unknown inversion method {method!r}; use one of {', '.join(METHODS)}")
    check_caption(pipe.tokenizer, prompt)
    steps = steps or pipe.cfg.steps
    guidance = pipe.cfg.guidance if guidance is None else float(guidance)
    t0 = time.perf_counter()
    img = load_image(image, pipe.cfg.image_size)
    z_0 = encode_image(pipe, img)
    cond = pipe.encode_text([prompt])
    trajectory = ddim_inversion(pipe, z_0, cond, steps, progress)
    info = {"model_fingerprint": fingerprint(pipe)}
    if pipe.size_conditioning.to_dict():  # SDXL sizes other than the image's own: the edit must use the same
        info["size_conditioning"] = pipe.size_conditioning.to_dict()
    uncond = offsets = None
    if method == "null-text":
        uncond, stats = null_text_optimisation(pipe, trajectory, cond, pipe.encode_negative(""), steps, guidance,
                                               inner_steps=inner_steps, early_stop=early_stop, lr=lr, progress=progress)
        info.update(stats, inner_steps=inner_steps, early_stop=early_stop, lr=lr)
    elif method == "negative-prompt":
        uncond = cond.float().cpu()
    elif method == "direct":
        offsets = direct_offsets(pipe, trajectory, cond, pipe.encode_negative(""), steps, guidance)
    info["seconds"] = time.perf_counter() - t0
    return Inversion(trajectory[-1].float().cpu(), prompt, method, steps, guidance, (img.height, img.width),
                     uncond, offsets, z_0, info)


class SourceOffsets(Controller):
    """Direct inversion (Ju et al. 2023): after each DDIM step, the step's offset d_i (1, 4, h, w) is added to
    row 0, the source, which so retraces the inverted trajectory exactly; the edited rows are left alone.
    Compose it before an edit's controller, so that local blending sees the corrected source."""

    def __init__(self, offsets: torch.Tensor):
        self.offsets = offsets  # (N, 1, 4, h, w)

    def begin_sampling(self, num_steps):
        if num_steps != len(self.offsets):
            raise ValueError(f"the direct inversion has offsets for {len(self.offsets)} steps, the sampler runs "
                             f"{num_steps}: an inversion is made for one number of steps")
        super().begin_sampling(num_steps)

    def end_step(self, step, z_t):
        return torch.cat([z_t[:1] + self.offsets[step].to(z_t.device, z_t.dtype), z_t[1:]])


def reconstruct(pipe, inversion: Inversion, *, controller=None, progress: bool = True) -> torch.Tensor:
    """z_0 regenerated from the inversion with its own caption: the source row of every edit of it
    (`controller`, e.g. an AttentionStore, sees its attention like a generation's)."""
    cond = pipe.encode_text([inversion.prompt])
    inputs = inversion.sampling_inputs(pipe)
    inputs["controller"] = Compose(inputs["controller"], controller)
    return pipe.denoise(cond=cond, steps=inversion.steps, guidance=inversion.guidance, progress=progress, **inputs)
