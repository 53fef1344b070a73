# The paper's DiT-XL/2 on ImageNet 256 (its Table 1; DiT's recipe): 32x32x4 latents of the SD KL-f8 VAE, cached by
#   torchrun --nproc_per_node=8 data.py --data_path /data/imagenet/train --image_size 256 --vae sd-vae-ft-ema \
#       --out latents/in256
# then, for the paper's runs (corrupted labels, CEP, or both as in its Fig. 8(b)):
#   torchrun --nproc_per_node=8 train.py config/dit_xl2_in256.py --corrupt 0.05       # eta = 5%
#   torchrun --nproc_per_node=8 train.py config/dit_xl2_in256.py --cep                # CEP-U, gamma = 1
#   torchrun --nproc_per_node=8 train.py config/dit_xl2_in256.py --corrupt 0.05 --cep
latents = "latents/in256"
model = "DiT-XL/2"
learn_sigma = True         # DiT: learned variance, the hybrid loss
prediction = "eps"
schedule = "linear"        # linspace(1e-4, 0.02), 1000 steps
min_snr_gamma = 0.0        # the plain MSE
class_dropout = 0.1
global_batch_size = 256
lr = 1e-4
weight_decay = 0.0
ema_decay = 0.9999
max_steps = 400_000
grad_clip = 0.0            # DiT clips no gradients
compile = True
dtype = "bfloat16"         # our choice, for speed: DiT trained in float32 (TF32); --dtype float32 for theirs
num_workers = 8
log_every = 100
ckpt_every = 10_000
grid_cfg_scale = 1.75      # the paper's guidance scale for DiT
