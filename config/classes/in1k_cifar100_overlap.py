"""
Writes in1k_cifar100_overlap.txt beside it: the ImageNet-1K classes that overlap CIFAR-100 through WordNet's
hierarchy, the subset of the paper's asymmetric corruption (Chen et al. 2024, App. B.1: "we first find the class
overlap between IN-1K and CIFAR-100 using WordNet"; the paper gives neither the rule nor the list: the rule is ours).

Rule: each CIFAR-100 class is the WordNet 3.0 noun synset(s) of its name in the sense its images and superclass show
(SENSES, chosen by hand; e.g. mushroom and sweet_pepper as food, in CIFAR's "fruit and vegetables"); an IN-1K class
overlaps when its synset (the number of its wnid) is one of them or lies under one through hypernym links.

  python config/classes/in1k_cifar100_overlap.py /usr/share/wordnet IMAGENET_WNIDS.txt

The first argument: WordNet 3.0's dict folder (Debian's wordnet-base); the second: IN-1K's 1000 wnids, one per line
(the sorted class folder names of ImageNet's train split; timm ships them as timm/data/_info/imagenet_synsets.txt).
A one-off tool: nothing in the project imports it.
"""
import os
import sys

# CIFAR-100 class -> WordNet 3.0 noun offsets. "": no synset fits (aquarium_fish is no WordNet noun).
SENSES = dict(
    apple="07739125", aquarium_fish="", baby="09827683", bear="02131653", beaver="02363005", bed="02818832",
    bee="02206856", beetle="02164464", bicycle="02834778", bottle="02876657", bowl="02880940", boy="10285313",
    bridge="02898711", bus="02924116", butterfly="02274259", camel="02437136", can="02946921", castle="02980441",
    caterpillar="02309337", cattle="02402425", chair="03001627", chimpanzee="02481823", clock="03046257",
    cloud="09247410", cockroach="02233338", couch="04256520", crab="01976957", crocodile="01697178", cup="03147509",
    dinosaur="01699831", dolphin="02068974", elephant="02503517", flatfish="02657368", forest="08438533",
    fox="02118333", girl="10084295", hamster="02342885", house="03544360", kangaroo="01877134", keyboard="03614007",
    lamp="03636649", lawn_mower="03649909", leopard="02128385", lion="02129165", lizard="01674464",
    lobster="01982650", man="10287213", maple_tree="12752205", motorcycle="03790512", mountain="09359803",
    mouse="02330245", mushroom="07734744", oak_tree="12268246", orange="07747607", orchid="12041446",
    otter="02444819", palm_tree="12582231", pear="07767847", pickup_truck="03930630", pine_tree="11608250",
    plain="09393605", plate="03959485", poppy="11900569", porcupine="02346627", possum="01874928", rabbit="02324045",
    raccoon="02508021", ray="01495701", road="04096066", rocket="04099429", rose="12620196", sea="09426788",
    seal="02076196", shark="01482330", shrew="01891633", skunk="02445715", skyscraper="04233124", snail="01944390",
    snake="01726692", spider="01772222", squirrel="02355227", streetcar="04335435", sunflower="11978233",
    sweet_pepper="07720615", table="04379243 04379964", tank="04389033", telephone="04401088",
    television="04404412 04405907", tiger="02129604", tractor="04465501", train="04468005", trout="02537085",
    tulip="12454159", turtle="01662784", wardrobe="04550184", whale="02062744", willow_tree="12724942",
    wolf="02114100", woman="10787470", worm="01922303")
# table: the furniture and the table set for a meal are two synsets; television: ImageNet's n04404412 (the system)
# holds TV sets, WordNet's receiver is 04405907


def read_wordnet(folder):
    """{offset: (first lemma, hypernym offsets)} of WordNet's nouns (data.noun; see WordNet's wndb(5))."""
    nouns = {}
    with open(os.path.join(folder, "data.noun"), encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):  # the licence
                continue
            fields = line.split(" | ")[0].split()
            words = int(fields[3], 16)
            ptr = 4 + 2 * words
            pointers = [fields[ptr + 1 + 4 * i: ptr + 5 + 4 * i] for i in range(int(fields[ptr]))]
            nouns[fields[0]] = (fields[4], [p[1] for p in pointers if p[0] in ("@", "@i") and p[2] == "n"])
    return nouns


def ancestors(offset, nouns):
    seen, todo = set(), [offset]
    while todo:
        o = todo.pop()
        if o not in seen:
            seen.add(o)
            todo += nouns[o][1]
    return seen


def main(wordnet, wnids_file):
    nouns = read_wordnet(wordnet)
    with open(wnids_file) as f:
        wnids = f.read().split()
    assert len(wnids) == 1000 and wnids == sorted(wnids), "expected IN-1K's 1000 wnids (sorted: the class indices)"
    lines = []
    for index, wnid in enumerate(wnids):
        up = ancestors(wnid[1:], nouns)
        matched = [c for c, offsets in SENSES.items() if up & set(offsets.split())]
        if matched:
            lines.append(f"{wnid}  # {index} {nouns[wnid[1:]][0]} <- {', '.join(matched)}")
    used = {m for line in lines for m in line.split("<- ")[1].split(", ")}
    header = [
        "# ImageNet-1K classes overlapping CIFAR-100 through WordNet 3.0's hierarchy: the subset of the paper's",
        "# asymmetric corruption (train.py --corrupt_type asym --corrupt_subset FILE). Made by the script of the same",
        "# name beside it (its docstring gives the rule, its SENSES the CIFAR-100 senses) from Debian's wordnet-base",
        "# 3.0 and IN-1K's sorted wnids. One wnid a line; after it, the IN-1K class index, WordNet's first lemma and",
        f"# the CIFAR-100 class(es) it falls under. {len(lines)} IN-1K classes from {len(used)} of CIFAR-100's 100.",
    ]
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "in1k_cifar100_overlap.txt")
    with open(out, "w") as f:
        f.write("\n".join(header + lines) + "\n")
    print(f"{out}: {len(lines)} classes; CIFAR-100 classes without one: {', '.join(sorted(set(SENSES) - used))}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
