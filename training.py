"""
What the training scripts share (train.py pre-trains, adapt.py adapts, distill.py distils): the process group, the
stop on SIGTERM or Ctrl-C, the data and its corrupted conditions, the EMA, the checks every few steps (NaN, the
stop, the log line), checkpoints written whole and an exact resume, the log with its loss curve.

Each script keeps its own loop, top to bottom; what is here is the bookkeeping around it.
"""
import atexit
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from cep import CEP, FixedCEP
from configurator import atomic_write
from corrupt import corrupt_conditions
from data import ImageCaptions, ImageFolder, LatentDataset, StepBatches, SyntheticShapes
from model import UNet_models
from pipeline import load_checkpoint
from vae import load_first_stage


def init_distributed():
    """torchrun's process group (NCCL on GPU, gloo on CPU), or one process: (rank, world_size, device). On GPU, TF32
    matmuls and convolutions, as DiT."""
    rank, world_size = 0, 1
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return rank, world_size, device


class Stop:
    """SIGTERM (a scheduler's notice before preemption) and Ctrl-C are noted here; at the next check every rank saves
    and stops cleanly. A second Ctrl-C stops at once, saving nothing. Under torchrun a Ctrl-C reaches a worker twice
    (from the terminal and from torchrun): the second within a second is the same one.

    SLURM sends SIGTERM to every process and a terminal sends SIGINT to all of its foreground processes: the loader's
    workers ignore both (`worker_init`), but for the SIGTERM multiprocessing sends them at exit, once `exiting` is
    set."""

    def __init__(self):
        self.requested = threading.Event()
        self.exiting = multiprocessing.Event()
        self.signal_name = ""
        self.first_interrupt = 0.0
        signal.signal(signal.SIGTERM, self.on_sigterm)
        signal.signal(signal.SIGINT, self.on_sigint)
        atexit.register(self.exiting.set)  # runs before multiprocessing's own exit function, which stops the workers

    def on_sigterm(self, *_):
        self.signal_name = self.signal_name or "SIGTERM"
        self.requested.set()

    def on_sigint(self, *_):
        if self.requested.is_set() and time.time() - self.first_interrupt > 1:
            raise KeyboardInterrupt("a second Ctrl-C: stopped without saving")
        if not self.requested.is_set():
            self.first_interrupt = time.time()
            self.signal_name = "Ctrl-C"
            tqdm.write("Ctrl-C: saving a checkpoint at the next step (a second Ctrl-C stops at once, saving nothing)")
        self.requested.set()

    def worker_init(self, _):
        signal.signal(signal.SIGTERM, lambda *_: self.exiting.is_set() and os._exit(0))
        signal.signal(signal.SIGINT, signal.SIG_IGN)


class Log:
    """The run's log: its lines on the console and in out_dir/log.txt (rank 0 only); the numbers of each logged step
    as a JSON line in log.jsonl, drawn as loss.png at each checkpoint; and to Weights & Biases when a project is
    named (wandb is imported only then)."""

    def __init__(self, out_dir, master, wandb_project="", wandb_run_name="", config=None):
        self.out_dir, self.master = out_dir, master
        self.wandb = None
        if master and wandb_project:
            import wandb
            self.wandb = wandb
            wandb.init(project=wandb_project, name=wandb_run_name or None, config=config)

    def config(self, config):
        """The run's whole configuration, once, in one line."""
        self(" ".join(["config:"] + [f"{k}={v!r}" for k, v in config.items()]))

    def __call__(self, message):
        if self.master:
            tqdm.write(message)
            with open(os.path.join(self.out_dir, "log.txt"), "a") as f:
                f.write(message + "\n")

    def numbers(self, **numbers):
        if self.master:
            with open(os.path.join(self.out_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(numbers) + "\n")
            if self.wandb is not None:
                self.wandb.log(numbers, step=numbers["step"])

    def plot(self):
        """loss.png from log.jsonl: the loss against the step, the last record of a step kept (a resumed run logs
        again the steps after its checkpoint)."""
        path = os.path.join(self.out_dir, "log.jsonl")
        if not self.master or not os.path.isfile(path):
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        with open(path) as f:
            losses = {record["step"]: record["loss"] for record in map(json.loads, f)}
        steps = sorted(losses)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, [losses[s] for s in steps], marker="." if len(steps) < 50 else None)
        ax.set(xlabel="step", ylabel="training loss (mean since the last log line)", yscale="log")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        with atomic_write(os.path.join(self.out_dir, "loss.png")) as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)


def check_training(config, world_size, ckpt_path, positive):
    """The checks every training script makes of its settings (config), before any work: the keys in `positive`
    above 0, the EMA's decay, the batch across the processes, the checkpoint a resume needs."""
    for key in positive:
        if config[key] <= 0:
            raise ValueError(f"{key} must be > 0, got {config[key]}")
    if not 0 <= config["ema_decay"] < 1:
        raise ValueError(f"ema_decay must be in [0, 1), got {config['ema_decay']}")
    if config["global_batch_size"] % world_size:
        raise ValueError(f"global_batch_size={config['global_batch_size']} is not divisible by the {world_size} "
                         "processes")
    if config["resume"] and not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"resume=True but there is no checkpoint {ckpt_path!r}")


def check_out_dir(out_dir, rank):
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write_test{rank}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"out_dir {out_dir!r} cannot be written: {e}") from e


def open_dataset(latents, data_path, text, image_size, flip=True, skipped=None, controls="", masks=False,
                 synthetic_size=20000, synthetic_seed=0, synthetic_scale=1.0):
    """The training set: a latent cache of data.py, a class folder, an image-caption set (text), or the built-in
    shapes. controls: a folder of control images beside data_path's; masks: the built-in shapes' masks."""
    if latents:
        dataset = LatentDataset(latents)
    elif data_path and text:
        dataset = ImageCaptions(data_path, image_size, controls)
    elif data_path:
        dataset = ImageFolder(data_path, image_size, flip, skipped=skipped, controls=controls)
    else:
        dataset = SyntheticShapes(synthetic_size, image_size, synthetic_seed, masks, synthetic_scale)
    if text and dataset.captions is None:
        raise ValueError(f"the cache {latents!r} holds no captions: extract it from captioned images")
    if not text and dataset.labels is None:
        raise ValueError(f"the cache {latents!r} holds captions, not classes: set text_encoder")
    return dataset


def first_stage_for(vae, dataset, latents, image_size, device):
    """The first stage (None in pixel space), what a checkpoint records of it (None, or dict(vae, scale)), and the
    shape it gives the model's input: (first_stage, recorded, channels, size). With a latent cache, the VAE is the one
    that wrote it unless `vae` names another, which must match it."""
    if latents and not vae:
        vae = dataset.meta["vae"]
    if not vae:
        return None, None, 3, image_size
    first_stage = load_first_stage(vae).to(device).eval().requires_grad_(False)
    recorded = dict(vae=os.path.abspath(vae), scale=first_stage.scale)
    if latents:
        channels, size = dataset.meta["latent_shape"][:2]
        cached = (dataset.meta["scale"], channels, size)
        if (first_stage.scale, first_stage.latent_channels, dataset.resolution // first_stage.factor) != cached:
            raise ValueError(f"vae {vae!r} is not the VAE that encoded the cache {latents!r} ({dataset.meta['vae']})")
        return first_stage, recorded, channels, size
    if image_size % first_stage.factor:
        raise ValueError(f"image_size={image_size} is not divisible by the VAE's downsampling {first_stage.factor}")
    return first_stage, recorded, first_stage.latent_channels, image_size // first_stage.factor


def corrupted_dataset(dataset, text, corrupt, corrupt_type, corrupt_mode, seed, corrupt_subset, corrupt_rewrites,
                      out_dir, master, world_size):
    """The dataset with its labels or captions corrupted once, from the seed (identical on every rank; corrupt.py),
    the audit record written to out_dir/corruption.json, naming each changed item's file where it has one. Returns
    (dataset, corruption: the summary the checkpoint keeps, prior: the class prior for random mode, or None)."""
    prior = None
    if text:
        dataset.captions, corruption, record = corrupt_conditions(dataset.captions, corrupt, corrupt_type,
                                                                  corrupt_mode, seed, rewrites=corrupt_rewrites)
    else:
        prior = torch.from_numpy(np.bincount(dataset.labels, minlength=len(dataset.classes))).float()
        dataset.labels, corruption, record = corrupt_conditions(dataset.labels, corrupt, corrupt_type, corrupt_mode,
                                                                seed, corrupt_subset, classes=dataset.classes)
    files = getattr(dataset, "paths", None)
    if record and files is not None and "indices" in record:  # a folder: the files a user can look at
        record["files"] = [files[i] for i in record["indices"]]
    if record and master:
        with atomic_write(os.path.join(out_dir, "corruption.json"), "w") as f:
            json.dump(record, f)
    if world_size > 1:  # every rank decided alone; a dataset listed differently on another node would silently differ
        records = [None] * world_size
        dist.all_gather_object(records, corruption)
        if any(r != corruption for r in records):
            raise RuntimeError(f"the ranks corrupted different conditions (is the dataset the same on every node?): "
                               f"{records}")
    return dataset, corruption, prior


def describe_cep(cep, cep_type, cep_scale, cep_fixed=0.0):
    if not cep:
        return "off"
    if cep_fixed:
        return f"{cep_type} gamma={cep_scale}, fixed for {cep_fixed:.1%}"
    return f"{cep_type} gamma={cep_scale}"


def perturbation(cep, cep_type, cep_scale, cep_fixed, seed, emb_dropout=0.0):
    """What perturbs the condition embedding in training: CEP (cep.py), Fixed CEP, dropout (a baseline), or None."""
    if cep_fixed:
        return FixedCEP(cep_type, cep_scale, cep_fixed, seed)
    if cep:
        return CEP(cep_type, cep_scale)
    if emb_dropout > 0:
        return nn.Dropout(emb_dropout)
    return None


def load_pretrained(key, path, out_dir, rank):
    """The checkpoint (or diffusers pipeline folder) of adapt.py's `init` or distill.py's `teacher`, once it is a
    pre-trained model: not adapted, no consistency student, and not the file this run would write; then out_dir is
    made (a bad checkpoint leaves no folder)."""
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{key} {path!r}: no such checkpoint (a pre-trained model, train.py's ckpt.pt)")
    if os.path.realpath(path) == os.path.realpath(ckpt_path):
        raise ValueError(f"{key} {path!r} would be overwritten by this run's checkpoints: pass another out_dir")
    state = load_checkpoint(path)
    args = state.get("model_args")
    if not args or "adapter" in args or args.get("guidance_embed"):
        raise ValueError(f"{key} {path!r} is not a pre-trained checkpoint of train.py (it is adapted, or a student)")
    check_out_dir(out_dir, rank)
    state.setdefault("schedule", "linear")  # checkpoints older than the schedule setting: DiT's
    return state


@torch.no_grad()
def update_ema(ema, model, decay):
    # frozen parameters (a frozen CLIP, an adapted model's base) stay as they are
    pairs = [(e, p) for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
    torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1 - decay)


def resume_or_start(resume, ckpt_path, device, model_args, corruption, net, ema, opt, lr, weight_decay, max_steps,
                    log):
    """(step, elapsed seconds): 0 for a new run; for --resume, the state of ckpt_path loaded into net, ema and opt,
    once it is this run's model and corruption, with this run's lr and weight decay (a resume may lower them). A run
    already at max_steps ends the script here: no data loader, no grid, its checkpoint untouched (study.py resumes
    every run)."""
    if not resume:
        return 0, 0.0
    state = load_checkpoint(ckpt_path, map_location=device)
    if "opt" not in state:
        raise ValueError(f"{ckpt_path!r} holds weights only (a bare state dict): sample.py can sample it, but a resume "
                         "needs what the training scripts save beside them (optimiser, step); use another out_dir")
    if state["model_args"] != model_args:
        keys = sorted({*state["model_args"], *model_args})
        differ = [k for k in keys if state["model_args"].get(k) != model_args.get(k)]
        diff = [f"{'model' if k == 'name' else k} {state['model_args'].get(k, '-')} in the checkpoint, "
                f"{model_args.get(k, '-')} in this run" for k in differ]
        raise ValueError(f"{ckpt_path!r} holds another model than this run asks for ({'; '.join(diff)}): resume with "
                         "the checkpoint's settings (its config is in it), or use another out_dir")
    if state["corruption"] != corruption:
        raise ValueError(f"the checkpoint was trained with corruption {state['corruption']}, this run has {corruption}")
    net.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    for group in opt.param_groups:
        group.update(lr=lr, weight_decay=weight_decay)
    log(f"resumed from {ckpt_path} at step {state['step']}")
    if state["step"] >= max_steps:
        log(f"{ckpt_path} is at step {state['step']}, max_steps={max_steps}: nothing to train")
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit()
    return state["step"], state.get("elapsed", 0.0)


def cpu_layout(net, name, device):
    """A U-Net on CPU in channels-last: oneDNN's NHWC convolutions and group norms are faster there; on GPU, PyTorch's
    eager group norm would convert back to NCHW at each norm."""
    if name in UNet_models and not device.startswith("cuda"):
        return net.to(memory_format=torch.channels_last)
    return net


def describe_size(net):
    total = sum(p.numel() for p in net.parameters()) / 1e6
    trained = sum(p.numel() for p in net.parameters() if p.requires_grad) / 1e6
    return f"{total:.2f}M parameters, {trained:.2f}M trained"


def optimizer_and_ema(net, lr, weight_decay):
    """AdamW over the trained parameters (fused: one kernel for all of them, on GPU and on CPU, where it is far
    faster than the foreach implementation) and the EMA, a frozen copy of net."""
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay,
                            fused=True)
    return opt, deepcopy(net).requires_grad_(False).eval()


def seed_step(seed, step, rank):
    """The RNG re-seeded at every step from (seed, step, rank): timesteps, noise, label dropout, CEP and random-mode
    corruption are a function of the step, which is what makes a resume continue exactly, with no RNG state saved."""
    torch.manual_seed((seed * 1_000_003 + step) * 4096 + rank)


def for_training(net, compile, compile_mode, device, dtype):
    """(the module the loop calls, its autocast): net compiled (torch.compile's mode) and wrapped in DDP under
    torchrun (checkpoints save net itself, whose names are the model's); bf16 autocast on GPU (float16 would need a
    gradient scaler), none on CPU or with dtype float32."""
    train_net = net
    if compile:
        train_net = torch.compile(net, mode=compile_mode)
    if dist.is_initialized():
        train_net = DDP(train_net, device_ids=[device] if device.startswith("cuda") else None)
    autocast = nullcontext()
    if device.startswith("cuda") and dtype != "float32":
        autocast = torch.autocast("cuda", dtype=getattr(torch, dtype))
    return train_net, autocast


def worker_start(num_workers):
    """The start method of a script's loader workers: fork. Spawn and forkserver (macOS's default, and Linux's from
    Python 3.14) start a worker by running the script's top-level code again, which is a training run."""
    if num_workers == 0:
        return None
    if "fork" not in multiprocessing.get_all_start_methods():
        raise ValueError(f"num_workers={num_workers}: loader workers need the fork start method, which this platform "
                         "lacks; set num_workers=0")
    return "fork"


def step_loader(dataset, global_batch_size, rank, world_size, seed, step, max_steps, num_workers, device, stop):
    """(loader, batches): the batches of the steps from `step` to max_steps, each from (seed, step), this rank's share
    of it (data.StepBatches), so a resumed run reads what an uninterrupted one would. Iterating `batches` again gives
    the dataset indices."""
    batches = StepBatches(len(dataset), global_batch_size, rank, world_size, seed, step, max_steps)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                         pin_memory=device.startswith("cuda"), persistent_workers=num_workers > 0,
                                         worker_init_fn=stop.worker_init,
                                         multiprocessing_context=worker_start(num_workers))
    return loader, batches


def start(config, net, opt, ema, dataset, model_args, corruption, rank, world_size, device, log, stop):
    """What a training loop starts from: (step, elapsed, train_net, autocast, loader, batches), the state resumed
    when config["resume"] (resume_or_start), the module the loop calls and its autocast (for_training), and the
    batches of the steps left (step_loader)."""
    ckpt_path = os.path.join(config["out_dir"], "ckpt.pt")
    step, elapsed = resume_or_start(config["resume"], ckpt_path, device, model_args, corruption, net, ema, opt,
                                    config["lr"], config["weight_decay"], config["max_steps"], log)
    train_net, autocast = for_training(net, config["compile"], config["compile_mode"], device, config["dtype"])
    loader, batches = step_loader(dataset, config["global_batch_size"], rank, world_size, config["seed"], step,
                                  config["max_steps"], config["num_workers"], device, stop)
    return step, elapsed, train_net, autocast, loader, batches


class Steps:
    """What follows the backward pass of each step: the gradient clipped, the optimiser's step and the EMA's, the loss
    summed on the device, and every 10 steps at most one host-device sync that checks for NaN (loss, gradients; the
    weights before a checkpoint), gathers the stop request of every rank and writes the log line. Every rank sees the
    same result, so they save and stop together. Then the checkpoint when due, and rank 0's sample grid."""

    def __init__(self, step, elapsed, config, device, log, stop, record, grid, skipped=None):
        """config: the run's settings (max_steps, log_every, ckpt_every, sample_every, global_batch_size, grad_clip,
        ema_decay, out_dir); record: what each checkpoint holds beside the weights, the optimiser, the step and the
        time (config, model_args, prediction...: what sample.py, adapt.py and distill.py read back); grid(path):
        writes the sample grid, at the end and every sample_every steps; skipped: the count of unreadable images."""
        self.step, self.elapsed, self.device, self.config = step, elapsed, device, config
        self.max_steps, self.log_every, self.ckpt_every = config["max_steps"], config["log_every"], config["ckpt_every"]
        self.log, self.stop, self.record, self.grid = log, stop, record, grid
        self.ckpt_path = os.path.join(config["out_dir"], "ckpt.pt")
        self.skipped = skipped
        self.ddp = dist.is_initialized()
        self.loss_sum = torch.zeros((), device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.stopping = False
        self.last_step, self.last_time = step, time.time()
        self.progress = tqdm(total=self.max_steps, initial=step, disable=not log.master, dynamic_ncols=True)

    def update(self, loss, net, opt, ema):
        """After loss.backward(): the step of the optimiser and of the EMA, the checks, the log, the checkpoint and
        the grid when due. True when the run is to stop (SIGTERM or Ctrl-C: the checkpoint is saved)."""
        grad_norm = nn.utils.clip_grad_norm_(net.parameters(), self.config["grad_clip"] or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_ema(ema, net, self.config["ema_decay"])
        self.loss_sum += loss.detach()
        self.nonfinite |= ~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm)  # NaN gradients: NaN weights
        self.step += 1
        self.progress.update()
        at_log = self.step % self.log_every == 0 or self.step == self.max_steps
        at_ckpt = self.step % self.ckpt_every == 0 or self.step == self.max_steps
        if at_log or at_ckpt or self.step % 10 == 0:
            self.check(at_ckpt, net)
        if at_log:
            self.log_line()
        if at_ckpt or self.stopping:
            self.save(net, ema, opt)
        if self.stopping:
            return True
        sample_every = self.config["sample_every"]
        if self.log.master and (self.step == self.max_steps or (sample_every and self.step % sample_every == 0)):
            self.grid(os.path.join(self.config["out_dir"], f"samples_{self.step:07d}.png"))
        return False

    def check(self, at_ckpt, net):
        if at_ckpt or self.stop.requested.is_set():  # finite gradients can still overflow the weights
            self.nonfinite |= ~torch.stack([torch.isfinite(p).all() for p in net.parameters()]).all()
        skipped = self.skipped.value if self.skipped is not None else 0
        sigterm = self.stop.signal_name == "SIGTERM"
        interrupt = self.stop.signal_name == "Ctrl-C"
        host = torch.tensor([sigterm, interrupt, skipped], device=self.device)
        stats = torch.cat([torch.stack([self.loss_sum, self.nonfinite.float()]), host])
        if self.ddp:
            dist.all_reduce(stats)
        # sums over the ranks: a rank that got no signal stops with the others, and names theirs
        self.loss_total, nonfinite_ranks, sigterms, interrupts, self.skipped_total = stats.tolist()
        self.stopping = bool(sigterms or interrupts)
        if self.stopping and not self.stop.signal_name:
            self.stop.signal_name = "SIGTERM" if sigterms else "Ctrl-C"
        if nonfinite_ranks:
            kept = "no checkpoint was written"
            if os.path.isfile(self.ckpt_path):
                kept = f"the last good checkpoint {self.ckpt_path!r} is kept"
            raise FloatingPointError(f"the loss or the weights became NaN or infinite between steps {self.last_step} "
                                     f"and {self.step}; {kept}")

    def log_line(self):
        now = time.time()
        world_size = dist.get_world_size() if self.ddp else 1
        steps = self.step - self.last_step
        loss = self.loss_total / world_size / steps
        images_per_second = steps * self.config["global_batch_size"] / (now - self.last_time)
        self.elapsed += now - self.last_time
        line = f"step {self.step} | loss {loss:.4f} | {images_per_second:.1f} img/s | elapsed {self.elapsed:.0f}s"
        if self.skipped_total:
            line += f" | {self.skipped_total:.0f} unreadable images skipped"
        self.log(line)
        self.log.numbers(step=self.step, loss=loss, images_per_second=images_per_second, elapsed=self.elapsed)
        self.loss_sum.zero_()
        self.last_step, self.last_time = self.step, now

    def save(self, net, ema, opt):
        """The checkpoint (rank 0's), written whole: a kill or a full disk mid-write leaves the previous one; then the
        loss curve."""
        if self.log.master:
            elapsed = self.elapsed + time.time() - self.last_time
            state = dict(self.record, model=net.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                         step=self.step, elapsed=elapsed)
            with atomic_write(self.ckpt_path) as f:
                torch.save(state, f)
            self.log.plot()
        if self.stopping:
            self.log(f"{self.stop.signal_name}: saved {self.ckpt_path} at step {self.step} and stopped; continue "
                     "with the same command and --resume")

    def finish(self):
        self.progress.close()
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
