"""Run by test_ddp.py in 2 gloo processes: ITC loss, hard negatives and gradients across ranks."""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from blip2_train.models import losses


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    r, w = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    img_all = F.normalize(torch.randn(w * 3, 4, 8), dim=-1)
    txt_all = F.normalize(torch.randn(w * 3, 8), dim=-1)
    img = img_all[r * 3 : (r + 1) * 3].clone().requires_grad_(True)
    txt = txt_all[r * 3 : (r + 1) * 3].clone().requires_grad_(True)
    res = losses.itc_loss(img, txt, torch.tensor(0.07))
    res.loss.backward()
    g = torch.Generator().manual_seed(r)
    neg_img, neg_txt = losses.sample_hard_negatives(res.sim_i2t, res.sim_t2i, res.pos_mask, g)
    torch.save({"loss": res.loss.detach(), "img_grad": img.grad, "txt_grad": txt.grad, "pos": res.pos_mask,
                "neg_img": neg_img, "neg_txt": neg_txt}, f"{out_path}.{r}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
