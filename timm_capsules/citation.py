"""The paper this package implements, written once: the model cards, the DiverseMultiMNIST dataset card and the
README cite it from here (a test holds the README's copy to it)."""

PAPER = 'Capsules with Inverted Dot-Product Attention Routing (Tsai, Srivastava, Goh, Salakhutdinov; ICLR 2020)'
ARXIV = 'https://arxiv.org/abs/2002.04764'
BIBTEX = """\
@inproceedings{tsai2020capsules,
  title     = {Capsules with Inverted Dot-Product Attention Routing},
  author    = {Tsai, Yao-Hung Hubert and Srivastava, Nitish and Goh, Hanlin and Salakhutdinov, Ruslan},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2020},
  url       = {https://arxiv.org/abs/2002.04764}
}"""
