"""How exactly the LM head's weight gradient is summed over the loss's chunks, against float64, three ways:
fp32 products (cuBLAS's `out_dtype=float32`), bf16 products summed in fp32 (what loss_minigpt.py does on every
device), and one bf16 product of the whole batch (the plain head under autocast: nanoGPT, transformers' GPT-2).

    python bench/loss_precision.py      # GPT-2's padded vocabulary, 4 chunks of 2,668 rows (~10 GB of RAM)
"""

import torch


def relative_error(gradient, exact):
    return ((gradient.double() - exact).norm() / exact.norm()).item()


def main(vocab=50304, n_embd=768, chunks=4, rows=2668):
    torch.manual_seed(0)
    hidden = torch.randn(chunks * rows, n_embd).bfloat16()
    probs = (torch.softmax(2 * torch.randn(chunks * rows, vocab), 1) / (chunks * rows)).bfloat16()
    exact = probs.double().t() @ hidden.double()
    fp32_products, bf16_products = torch.zeros(vocab, n_embd), torch.zeros(vocab, n_embd)
    for chunk in range(chunks):
        p, h = probs[chunk * rows : (chunk + 1) * rows], hidden[chunk * rows : (chunk + 1) * rows]
        fp32_products += p.float().t() @ h.float()  # bf16 products are exact in fp32: cuBLAS's fp32 output
        bf16_products += p.t() @ h
    one_bf16_product = (probs.t() @ hidden).float()
    print(f"relative error against float64: fp32 products {relative_error(fp32_products, exact):.2e} | bf16 products "
          f"summed in fp32 {relative_error(bf16_products, exact):.2e} | one bf16 product {relative_error(one_bf16_product, exact):.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
