# The paper's text-to-image LDM-4 on CC3M (its Table 1, App. B.3): a pre-trained bert-base-uncased, trained with the
# U-Net (one learning rate for both: ours, as LDM's text-to-image configs), into its cross-attention; the VQ-f4
# latents of CC3M (as img2dataset writes it: cc3m/00000/000000000.jpg beside 000000000.txt), cached by
#   torchrun --nproc_per_node=8 data.py --data_path cc3m --captions --image_size 256 --vae ldm-vq-f4 --out latents/cc3m
# then:
#   torchrun --nproc_per_node=8 train.py config/ldm4_cc3m.py --corrupt 0.05 --corrupt_type swap   # swapped captions
#   torchrun --nproc_per_node=8 train.py config/ldm4_cc3m.py --cep                                # CEP-U on tokens
latents = "latents/cc3m"
model = "LDM-4"
text_encoder = "bert"
bert_path = "bert-base-uncased"  # the Hugging Face folder: config.json, vocab.txt, model.safetensors
learn_sigma = False
prediction = "eps"
schedule = "scaled_linear"
min_snr_gamma = 0.0
class_dropout = 0.1        # captions dropped to the empty one, for classifier-free guidance
global_batch_size = 512
lr = 1e-4
weight_decay = 0.0
ema_decay = 0.9999
max_steps = 396_000        # the paper's Table 3: 396K iterations on CC3M (about 7.5 days on 8 A100s)
grad_clip = 0.0
compile = True
dtype = "bfloat16"         # our choice, for speed
num_workers = 8
log_every = 100
ckpt_every = 10_000
grid_cfg_scale = 3.0       # the paper's guidance scale for LDM-4 on CC3M
