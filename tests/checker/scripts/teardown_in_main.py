"""Teardown attribution when the script's work is in main() and it ends by sys.exit."""

import sys

import torch

import streamkit as sk

side = sk.Stream()
kept = []


def main():
    x = torch.ones(4, device=sk.device())
    y = torch.ones(2, device=sk.device())
    side.wait_stream(sk.current_stream())
    with sk.switch(side):
        x.sum()  # <side-read>
    kept.append(x)  # freed only at teardown
    with sk.switch(side):
        y.sum()  # <local-read>
    # y is freed when the exception's frames are, after the script has ended
    sys.exit(3)  # <exit>


if __name__ == "__main__":
    main()
