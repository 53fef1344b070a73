# The paper's downstream stage (Section 3.2, Table 2): a ControlNet on ImageNet-100 with Canny edges (OpenCV's,
# thresholds 100 and 200), on a pre-trained class-conditional LDM-4 (clean, corrupted or CEP), 8 GPUs:
#   torchrun --nproc_per_node=8 train.py config/controlnet_canny.py --init out/ldm4/ckpt.pt \
#       --data_path /data/imagenet100/train --out_dir out/ldm4_canny
# T2I-Adapter: add --adapter t2i. Segmentation maps: --control /data/imagenet100_sam/train (a colour map per image,
# same names and sizes). The settings below must be the pre-training's: train.py checks them against --init.
adapter = "controlnet"
control = "canny"
model = "LDM-4"
image_size = 256
vae = "ldm-vq-f4"           # the VQ-f4 folder the LDM-4 was trained with: images are encoded on the fly
prediction = "eps"
learn_sigma = False
min_snr_gamma = 0.0
global_batch_size = 32      # the paper: diffusers' default batch size; ours: its train_controlnet.py's 4 per GPU
lr = 5e-6                   # the paper: diffusers' default learning rate; ours: train_controlnet.py's
ema_decay = 0.9999
max_steps = 40000           # 10 epochs of ImageNet-100 (about 127K images) at batch 32
compile = True
num_workers = 8
log_every = 100
ckpt_every = 5000
