# The paper's LDM-4 on ImageNet 256 (its Table 1; CompVis's cin256-v2 config): a U-Net with cross-attention on the
# 64x64x3 latents of LDM's VQ-f4 autoencoder (the vqvae folder of CompVis/ldm-celebahq-256), cached by
#   torchrun --nproc_per_node=8 data.py --data_path /data/imagenet/train --image_size 256 --vae ldm-vq-f4 \
#       --out latents/vq
# then:
#   torchrun --nproc_per_node=8 train.py config/ldm4_in256.py --corrupt 0.025    # eta = 2.5%
#   torchrun --nproc_per_node=8 train.py config/ldm4_in256.py --cep              # CEP-U, gamma = 1
#   torchrun --nproc_per_node=8 train.py config/ldm4_in256.py --corrupt 0.05 --cep   # both: the paper's Fig. 8(b)
latents = "latents/vq"
model = "LDM-4"
learn_sigma = False        # LDM: fixed variance, eps-MSE
prediction = "eps"
schedule = "scaled_linear"  # CompVis's "linear": linspace(sqrt(0.0015), sqrt(0.0195))^2
min_snr_gamma = 0.0
class_dropout = 0.1
global_batch_size = 512    # 64 per GPU on 8 GPUs
lr = 1e-4
weight_decay = 0.0
ema_decay = 0.9999
max_steps = 178_000        # the paper's Table 3: 178K iterations on IN-1K (about 2.5 days on 8 A100s)
grad_clip = 0.0            # LDM clips no gradients
compile = True
dtype = "bfloat16"         # our choice, for speed: LDM trained in float32
num_workers = 8
log_every = 100
ckpt_every = 10_000
grid_cfg_scale = 2.0       # the paper's guidance scale for LDM-4 on ImageNet
