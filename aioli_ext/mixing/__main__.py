"""``python -m aioli_ext.mixing``: the mixers side by side in the simulated linear-law run (no model, ~10 s)."""
from .simulation import compare_methods


def main():
    table = compare_methods()
    base = table["stratified"]
    print(f"{'method':<12} {'final avg loss':<18} paired delta vs stratified, per seed")
    for name, values in table.items():
        delta = " ".join(f"{value:+.4f}" for value in (values - base).tolist())
        print(f"{name:<12} {values.mean().item():.4f} +- {values.std().item():.4f}  {delta}")


if __name__ == "__main__":
    main()
