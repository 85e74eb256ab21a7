"""DNA sequence operations."""

NAME = "dna"

COMPLEMENT = {"A": "T", "T": "A", "G": "C", "C": "G"}
CODONS = {
    "AUG": "M", "UUU": "F", "UUC": "F", "UUA": "L", "UUG": "L", "CUU": "L", "CUC": "L", "CUA": "L", "CUG": "L",
    "AUU": "I", "AUC": "I", "AUA": "I", "GUU": "V", "GUC": "V", "GUA": "V", "GUG": "V", "UCU": "S", "UCC": "S",
    "UCA": "S", "UCG": "S", "CCU": "P", "CCC": "P", "CCA": "P", "CCG": "P", "ACU": "T", "ACC": "T", "ACA": "T",
    "ACG": "T", "GCU": "A", "GCC": "A", "GCA": "A", "GCG": "A", "UAU": "Y", "UAC": "Y", "CAU": "H", "CAC": "H",
    "CAA": "Q", "CAG": "Q", "AAU": "N", "AAC": "N", "AAA": "K", "AAG": "K", "GAU": "D", "GAC": "D", "GAA": "E",
    "GAG": "E", "UGU": "C", "UGC": "C", "UGG": "W", "CGU": "R", "CGC": "R", "CGA": "R", "CGG": "R", "AGU": "S",
    "AGC": "S", "AGA": "R", "AGG": "R", "GGU": "G", "GGC": "G", "GGA": "G", "GGG": "G", "UAA": "*", "UAG": "*",
    "UGA": "*",
}


def reverse_complement(sequence: str) -> str:
    """The reverse complement of a DNA sequence."""
    return "".join(COMPLEMENT[base] for base in reversed(sequence.upper()))


def transcribe(sequence: str) -> str:
    """DNA to RNA: T becomes U."""
    return sequence.upper().replace("T", "U")


def translate(rna: str) -> str:
    """RNA to protein, one letter per codon, stopping at the first stop codon."""
    protein = []
    for start in range(0, len(rna) - 2, 3):
        amino = CODONS[rna[start:start + 3].upper()]
        if amino == "*":
            break
        protein.append(amino)
    return "".join(protein)


def gc_content(sequence: str) -> float:
    """Percentage of G and C bases in a sequence."""
    sequence = sequence.upper()
    return 100.0 * sum(base in "GC" for base in sequence) / len(sequence)


TOOLS = [reverse_complement, transcribe, translate, gc_content]
