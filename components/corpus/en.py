"""English fairy tales and fables: the story function of the built-in grammar."""

from components.corpus.grammar import endings, options

# (how the opening introduces it, pronoun)
KINDS = [
    ("a little fox", "she"), ("an old king", "he"), ("a young princess", "she"),
    ("a poor tailor", "he"), ("a little girl", "she"), ("an old fisherman", "he"),
    ("a brave shepherd boy", "he"), ("a clever crow", "he"), ("a small mouse", "she"),
    ("a kind dragon", "he"), ("a lonely giant", "he"), ("a wise old woman", "she"),
    ("a young woodcutter", "he"), ("a gentle bear", "he"), ("a shy rabbit", "she"),
    ("a proud rooster", "he"), ("a miller's daughter", "she"), ("a little prince", "he"),
    ("a busy beaver", "she"), ("a merry cobbler", "he"), ("a hungry wolf cub", "he"),
    ("a tiny hedgehog", "she"), ("a weaver", "she"), ("a farmer's son", "he"),
]
PRONOUNS = {"he": ("he", "him", "his"), "she": ("she", "her", "her")}
NAMES = {"he": ["Tom", "Hans", "Peter", "Jack", "Oliver", "Martin", "Felix", "Jonas"],
         "she": ["Anna", "Greta", "Lily", "Rose", "Clara", "Mia", "Elsa", "Nora"]}
# (setting, the home it is later called)
SETTINGS = [
    ("a faraway kingdom", "the kingdom"), ("an old stone castle", "the castle"), ("a fishing village by the sea", "the village"),
    ("the heart of a deep forest", "the forest"), ("a village at the foot of a snowy mountain", "the mountain village"),
    ("a little town by the river", "the town"), ("a valley full of apple trees", "the valley"),
    ("an oasis in the desert", "the oasis"), ("a cottage at the edge of the woods", "the cottage"),
    ("an island in the middle of a lake", "the island"), ("a busy city with golden towers", "the city"),
    ("a tent on the wide grassland", "the grassland"),
]
TRAITS = ["kind-hearted and always ready to help", "clever and quick", "brave but a little careless",
          "gentle and patient", "curious about everything", "honest and hard-working", "small but very determined",
          "cheerful and full of songs"]
TIMES = ["One summer, ", "One winter, ", "One morning, ", "One stormy night, ", "Many years later, ", "One spring day, "]
# (the problem, what the hero decides to do, how it ends)
PROBLEMS = [
    ("the well dried up and nobody had water to drink", "to find a fresh spring beyond the hills",
     "found the spring and led its water back home"),
    ("{s}'s mother fell ill, and the doctor said only the moonflower could cure her", "to look for the moonflower",
     "picked the moonflower, and soon {s}'s mother was well again"),
    ("a strange wind blew away the king's golden crown", "to bring the crown back",
     "found the golden crown and gave it back to the king"),
    ("the old oak on the hill fell sick and lost all its leaves", "to fetch magic dew for the old oak",
     "saved the old oak with the dew, and green leaves grew on it again"),
    ("the stars in the sky went out one by one", "to light the stars again",
     "lit the stars again, and the night sky sparkled once more"),
    ("the neighbour's little lamb went missing", "to find the little lamb", "found the lamb and brought it safely home"),
    ("heavy snow blocked every road, and {h} was running out of food", "to cross the mountains and bring back grain",
     "came back with grain, and everyone got through the winter"),
    ("a witch turned the children of {h} into stone", "to break the witch's spell",
     "broke the spell, and the children came back to life"),
    ("all the fish in the river vanished overnight", "to ask the Sea King for help",
     "won the Sea King's help, and the river was full of fish again"),
    ("a wounded bird fell in front of {o} door", "to take the little bird back to its nest",
     "brought the bird home to its nest, and its mother sang for joy"),
]
PROVISIONS = ["a bag of bread", "a flask of water", "an old umbrella", "a stout walking stick", "a warm woollen coat",
              "a little lantern"]
DURATIONS = ["three days and three nights", "seven long days", "many months", "a whole day and a night",
             "weeks and weeks", "a long, long way"]
# (where, what makes it hard, how the magic object solves it)
OBSTACLES = [
    ("a wide river", "The water was deep and fast, and {s} could not get across.",
     "a rainbow bridge rose over the river, so {n} walked safely across"),
    ("a dark forest", "It was so dark among the trees that {s} could not see {o} own hands.",
     "the forest filled with light, so {n} found the path"),
    ("a steep cliff", "The rock was as smooth as glass, and nobody could climb it.",
     "stone steps appeared in the cliff, so {n} climbed up one step at a time"),
    ("a great swamp", "The mud was soft and deep, and every step sank further down.",
     "water lilies covered the swamp, so {n} crossed on their leaves"),
    ("a mountain of ice", "The wind howled, and {s} shivered with cold.",
     "the ice slowly melted away and showed a narrow path"),
    ("the mouth of a cave", "A huge snake guarded the cave and let no one pass.",
     "the snake fell fast asleep, so {n} tiptoed past it"),
    ("the edge of a desert", "There was not a drop of water, and the sun burned down.",
     "soft rain began to fall, so {n} crossed the desert safely"),
    ("the gate of a maze", "Its paths twisted and turned, and whoever went in never came out.",
     "a firefly came to show the way, so {n} was soon out of the maze"),
]
HELPERS = [
    ("an old tortoise with a white beard", "the tortoise"), ("a talking owl", "the owl"),
    ("a fairy dressed in white", "the fairy"), ("an old linden tree that could speak", "the linden tree"),
    ("an old man with a walking stick", "the old man"), ("a golden bee", "the bee"), ("a silver fish", "the silver fish"),
    ("the spirit of the mountain", "the mountain spirit"),
]
# (what the helper asks, what the hero does)
REQUESTS = [
    ("My children are sick. Could you gather some herbs for them?",
     "{n} searched the hillside and came back with an armful of herbs."),
    ("The wind has broken my home. Will you help me mend it?", "{n} carried wood and stones and helped {x} mend it."),
    ("I am so lonely. Will you stay and talk with me?", "{n} sat down and talked with {x} all evening."),
    ("Answer my riddle, and I will help you.", "{n} thought for a moment and gave the right answer."),
    ("My key fell into the well. Can you fish it out?", "{n} tied a rope to a bucket and fished the key out of the well."),
    ("I am thirsty. Will you give me a sip of water?", "{n} gave {x} all the water {s} had left."),
]
# (the gift, how it is used)
OBJECTS = [
    ("a jade flute", "played the jade flute"), ("a magic mirror", "held up the magic mirror"),
    ("a golden key", "turned the golden key"), ("a shining pearl", "held out the shining pearl"),
    ("a white feather", "waved the white feather"), ("a little gourd", "opened the little gourd"),
    ("a red ribbon", "untied the red ribbon"), ("a magic seed", "planted the magic seed"),
]
FAREWELLS = ["When you are in trouble, it will help you.", "Remember, only a kind heart can use it.",
             "When you are done, give it back to the earth.", "It works only once, so use it when you need it most."]
ENDINGS = ["everyone cheered.", "{s} lived happily ever after.", "{s} told the story to all the children.",
           "{s} promised to visit {x} every year.", "nobody ever laughed at {o} again."]
# A fable ends with its moral, a fairy tale with a closing formula.
MORAL_INTROS = ["The moral of the story: ", "And so we learn that "]
CLOSINGS = ["And if they have not died, they are living there still.", "Snip, snap, snout, this tale is told out.",
            "And that is the end of the tale."]
MORALS = ["patience wins in the end", "helping others helps ourselves", "kindness is always repaid",
          "a clever head beats a strong arm", "friends make every road shorter", "a brave heart is worth more than treasure",
          "what is begun must be finished", "the gifts of nature must be cherished"]


def story(d):
    """One story: the opening sentence is the prompt, the rest the continuation."""
    opening = d.choose("opening", options("Once upon a time, in ", "Long, long ago, ", "There was once "))
    if opening == "Once upon a time, in ":
        home = d.choose("setting", options(*SETTINGS))
        d.say(", there lived ")
    kind, gender = d.choose("kind", options(*[(k[0], k) for k in KINDS]))
    s, o, poss = PRONOUNS[gender]
    d.say(" named " if opening != "Long, long ago, " else " called ")
    n = d.choose("name", options(*NAMES[gender]))
    if opening == "Long, long ago, ":
        d.say(" lived in ")
        home = d.choose("setting", options(*SETTINGS))
    elif opening == "There was once ":
        d.say(", who lived in ")
        home = d.choose("setting", options(*SETTINGS))
    d.say(".")
    d.prompt_ends_here()

    d.say(f" {n} was ")
    d.choose("trait", options(*TRAITS))
    d.say(". ")
    d.choose("time", options(*TIMES))
    _, action, resolution = d.choose("problem", options(
        *[(q.format(s=n, o=poss, h=home), (q, a, r)) for q, a, r in PROBLEMS]))
    d.say(f". {n} decided {action}. {s.capitalize()} took ")
    d.choose("provision", options(*PROVISIONS))
    d.say(" and walked for ")
    d.choose("duration", options(*DURATIONS))
    d.say(f" until {s} came to ")
    hard, solution = d.choose("obstacle", options(*[(ob[0], ob[1:]) for ob in OBSTACLES]))
    d.say(". " + hard.format(s=s, o=poss) + " Just then, ")
    x = d.choose("helper", options(*HELPERS))
    d.say(" appeared. “")
    deed = d.choose("request", options(*REQUESTS))
    d.say(f"” said {x}. " + deed.format(n=n, x=x, s=s) + f" {x[0].upper() + x[1:]} was delighted and gave {n} ")
    use = d.choose("object", options(*OBJECTS))
    d.say(". “")
    d.choose("farewell", options(*FAREWELLS))
    d.say(f"” said {x}. {n} {use}, and {solution.format(n=n)}. At last, {n} {resolution.format(s=n)}. "
          f"When {s} got back to {home}, ")
    d.choose("ending", options(*[e.format(s=s, o=o, x=x) for e in ENDINGS]))
    d.say(" ")
    genre = d.choose("close", endings({"fable": MORAL_INTROS, "fairy_tale": CLOSINGS}))
    if genre == "fable":
        d.choose("moral", options(*MORALS))
        d.say(".")
    return [genre]
