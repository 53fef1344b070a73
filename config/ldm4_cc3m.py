# The paper's text-to-image LDM-4 on CC3M (its Table 1), here with CLIP ViT-L/14's frozen text encoder where the
# paper trained a BERT: the VQ-f4 latents of CC3M (as img2dataset writes it: cc3m/00000/000000000.jpg beside
# 000000000.txt), cached by
#   torchrun --nproc_per_node=8 data.py --data_path cc3m --captions --image_size 256 --vae ldm-vq-f4 --out latents/cc3m
# then:
#   torchrun --nproc_per_node=8 train.py config/ldm4_cc3m.py --corrupt 0.05 --corrupt_type swap   # swapped captions
#   torchrun --nproc_per_node=8 train.py config/ldm4_cc3m.py --cep                                # CEP-U on tokens
latents = "latents/cc3m"
model = "LDM-4"
text_encoder = "clip"
clip_model = "ViT-L/14"
learn_sigma = False
prediction = "eps"
schedule = "scaled_linear"
min_snr_gamma = 0.0
class_dropout = 0.1        # captions dropped to the empty one, for classifier-free guidance
global_batch_size = 512
lr = 1e-4
weight_decay = 0.0
ema_decay = 0.9999
max_steps = 150_000        # our choice: the paper does not give its CC3M step count
grad_clip = 0.0
compile = True
dtype = "bfloat16"         # our choice, for speed
num_workers = 8
log_every = 100
ckpt_every = 10_000
grid_cfg_scale = 3.0       # the paper's guidance scale for LDM-4 on CC3M
