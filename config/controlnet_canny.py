# The paper's downstream stage (Section 3.2, Table 2): a ControlNet on ImageNet-100 with Canny edges (OpenCV's,
# thresholds 100 and 200), on a pre-trained class-conditional LDM-4 (clean, corrupted or CEP), 8 GPUs:
#   torchrun --nproc_per_node=8 adapt.py config/controlnet_canny.py --init out/ldm4/ckpt.pt \
#       --data_path /data/imagenet100/train --out_dir out/ldm4_canny
# T2I-Adapter: add --adapter t2i. Segmentation maps: --control /data/imagenet100_sam/train (a colour map per image,
# same names and sizes). The model, image size, VQ-f4 first stage, prediction and schedule are the pre-trained
# checkpoint's (adapt.py takes them from --init).
# The paper: "the diffusers implementations with their default learning rate and batch size, 10 epochs". The
# defaults below are those of diffusers' examples/controlnet/train_controlnet.py and
# examples/t2i_adapter/train_t2i_adapter_sdxl.py (read at diffusers commit 000280f5, v0.22; the same values in
# later versions of train_controlnet.py): the same for both scripts.
adapter = "controlnet"
control = "canny"
global_batch_size = 32      # diffusers: --train_batch_size 4 per GPU, here on 8 GPUs (the paper ran 4 V100s: 16)
lr = 5e-6                   # diffusers: --learning_rate 5e-6, not scaled (--scale_lr off), constant (as train.py)
weight_decay = 1e-2         # diffusers: --adam_weight_decay 1e-2 (AdamW betas 0.9/0.999, eps 1e-8: torch's too)
grad_clip = 1.0             # diffusers: --max_grad_norm 1.0
ema_decay = 0.0             # diffusers' scripts keep no EMA: the "EMA" sample.py reads is the weights themselves
flip = False                # diffusers' scripts resize and crop, never flip (and then the controls can be cached)
class_dropout = 0.1         # ours, for guided sampling (diffusers: --proportion_empty_prompts 0; ControlNet: 0.5)
max_steps = 39591           # the paper's 10 epochs (diffusers: --num_train_epochs 1) of ImageNet-100 at batch 32,
                            # taken as CMC's split (Tian et al. 2019, 126,689 images; the paper lists no classes)
compile = True
num_workers = 8
log_every = 100
ckpt_every = 5000
