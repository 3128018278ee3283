"""Word lists of the prompt parser (:mod:`detailpp.parsing.decompose`), all lower case.

Two kinds: the *modifier lexicon* (colours, materials, shapes, styles, names whose adjective is part of the name,
clothing, ...), which says which words before a noun describe it, and the *global lexicon* (quality, lighting,
camera and medium tags, leading media, other languages' function words), which says which parts of a prompt belong
to the whole image and are never split. The grammar that uses them is in :mod:`detailpp.parsing.decompose`.
"""

from __future__ import annotations

import re

# --- the modifier lexicon ------------------------------------------------------------------------------------------

COLOURS = frozenset(
    """
    red orange yellow green blue purple pink brown black white grey gray violet indigo cyan magenta teal turquoise
    lavender beige maroon navy olive gold golden silver bronze copper crimson scarlet azure coral ivory khaki lime
    mint peach plum salmon tan amber burgundy charcoal cream emerald fuchsia lilac mauve ochre ruby sapphire aqua
    blond blonde auburn chartreuse vermilion cerulean cobalt sepia colorful colourful multicolored multicoloured
    rainbow monochrome reddish orangish yellowish greenish bluish purplish pinkish brownish blackish whitish greyish
    grayish golden-brown ginger
    """.split()
)
#: -ing words that name a kind of thing before a noun ("baking dish", "magnifying glass"), tagged VERB by spaCy.
GERUND_COMPOUNDS = frozenset(
    """
    baking dining living washing swimming frying rolling cutting vending sewing sleeping fishing shopping parking
    walking drinking dressing ironing mixing chopping boxing bowling measuring magnifying wrapping writing reading
    skating racing climbing diving surfing hiking camping cooking serving waiting landing
    """.split()
)
#: words that shade a following colour ("light yellow", "pastel teal") and join its attribute.
SHADES = frozenset("light dark pale pastel bright deep neon vivid dull muted soft hot baby royal sky snow".split())
MATERIALS = frozenset(
    """
    wooden wood metal metallic steel iron glass glassy plastic rubber leather fabric cotton wool woolen woollen silk
    silky velvet denim linen lace paper cardboard stone marble granite brick concrete ceramic porcelain clay crystal
    bamboo wicker straw fur furry fluffy feathery fuzzy knitted woven chrome brass aluminum aluminium tin titanium
    diamond jade pearl wax waxy satin suede tweed canvas rattan glossy matte shiny rusty transparent translucent
    gold silver bronze copper oak walnut mahogany neon
    """.split()
)
SHAPES = frozenset(
    """
    round square rectangular circular oval oblong triangular spherical cylindrical conical cubic cubical pyramidal
    pentagonal hexagonal octagonal teardrop crescent diamond curved flat big small large tiny huge tall short long
    wide narrow thick thin giant little miniature
    """.split()
)
#: style nouns that modify a following noun ("a Lego robot", "a watercolor fox").
STYLE_NAMES = frozenset(
    """
    lego sketch watercolor watercolour cyberpunk graffiti cartoon anime origami steampunk vaporwave pixel pixel-art
    low-poly claymation impressionist ukiyo-e manga comic vintage antique
    """.split()
)
STYLE_WORDS = frozenset({"style", "styled", "styles"})
#: suffixes of hyphenated modifiers ("heart-shaped", "sketch-style", "rose-colored").
MODIFIER_SUFFIXES = ("-shaped", "-style", "-styled", "-colored", "-coloured", "-like", "-themed", "-patterned")

#: every word that is a modifier wherever it stands before a noun.
MODIFIER_WORDS = COLOURS | MATERIALS | SHAPES | STYLE_NAMES | STYLE_WORDS

#: adjective + noun names whose adjective is part of the name (compared with the next word's lemma).
LEXICALISED = frozenset(
    {
        ("hot", "dog"),
        ("hot", "air"),
        ("hot", "sauce"),
        ("red", "panda"),
        ("polar", "bear"),
        ("grizzly", "bear"),
        ("golden", "retriever"),
        ("black", "hole"),
        ("white", "house"),
        ("french", "fry"),
        ("french", "fries"),
        ("french", "toast"),
        ("french", "horn"),
        ("green", "bean"),
        ("green", "tea"),
        ("black", "tea"),
        ("red", "wine"),
        ("white", "wine"),
        ("black", "pepper"),
        ("bell", "pepper"),
        ("grand", "piano"),
        ("high", "heel"),
        ("high", "chair"),
        ("remote", "control"),
        ("electric", "guitar"),
        ("solar", "panel"),
        ("sweet", "potato"),
        ("running", "shoe"),
        ("sleeping", "bag"),
        ("living", "room"),
        ("dining", "table"),
        ("dining", "room"),
        ("washing", "machine"),
        ("swimming", "pool"),
        ("frying", "pan"),
        ("rolling", "pin"),
        ("cutting", "board"),
        ("vending", "machine"),
        ("sewing", "machine"),
        ("traffic", "light"),
        ("stop", "sign"),
        ("oak", "tree"),
        ("hot", "chocolate"),
        ("black", "tie"),
        ("white", "tie"),
        ("walnut", "tree"),
    }
)

#: adjectives and adverbs that do not describe an object's look: kept in every prompt.
NON_MODIFIERS = frozenset(
    """
    only other another same such own many few several various numerous multiple more most less least much both each
    every all any some no certain entire whole first second third fourth fifth last next previous former latter final
    main favorite favourite left right top bottom front back rear upper lower middle central center centre near
    nearby far inner outer also just even too not very-same
    """.split()
)
#: nouns naming a place relative to something ("on the left of", "in front of"): never subjects.
RELATION_NOUNS = frozenset(
    "left right top bottom front back side middle center centre rear behind corner edge inside outside".split()
)
CLOTHING = frozenset(
    """
    coat jacket dress suit shirt t-shirt tshirt blouse sweater jumper hoodie cardigan vest tracksuit uniform costume
    robe gown tuxedo kimono armor armour outfit clothes clothing pajamas pyjamas overalls raincoat skirt trousers
    pants jeans shorts scarf hat cap helmet boots shoes sneakers gloves glasses sunglasses goggles mask apron cloak
    cape poncho bikini swimsuit sari attire
    """.split()
)
#: verbs whose object is worn ("wearing sunglasses", "who wears a hat", "donning a jacket").
WEAR_VERBS = frozenset({"wear", "don", "sport"})


# --- the global lexicon --------------------------------------------------------------------------------------------

#: words of quality, detail, lighting, camera, medium, style, mood, time of day and genre tags. A comma-separated
#: segment made only of these (and function words, numbers, resolutions) is global: "masterpiece", "best quality",
#: "highly detailed", "sharp focus", "soft light", "golden hour", "award winning photography".
GLOBAL_WORDS = frozenset(
    """
    masterpiece masterwork best quality high higher highest top amazing excellent great good perfect award winning
    award-winning beautiful stunning gorgeous breathtaking epic absurdres highres hires lowres resolution res
    detailed detail details highly ultra hyper super extremely very intricate intricately insanely fine sharp crisp
    clear focus focused unfocused blur blurry blurred soft hard dramatic cinematic moody atmospheric ethereal dreamy
    cozy cosy cute kawaii chibi whimsical surreal elegant minimal minimalist minimalism simple clean aesthetic
    realistic photorealistic photorealism hyperrealistic hyperrealism hyperreal photoreal realism lifelike natural
    raw uhd hd fhd qhd hdr sdr dslr slr mirrorless professional studio product commercial editorial fashion
    lighting light lights lit backlit backlight backlighting rim volumetric ambient global illumination glow
    glowing shadow shadows reflections reflection rays god sun sunlight moonlight candlelight neon golden hour
    warm cool cold tones tone colors colours colour color palette vibrant saturated desaturated muted pastel
    monochrome monochromatic contrast low key exposure long bokeh grain grainy film analog analogue noise vignette
    depth field shallow lens wide angle telephoto fisheye macro tilt-shift panorama panoramic portrait landscape
    close-up closeup close up full body shot view top side front aerial overhead bird's eye low angle isometric
    composition framing centered symmetrical rule thirds photo photograph photography photographic picture image
    still frame render rendered rendering octane unreal engine blender redshift vray cycles ray tracing raytracing
    ray-traced 3d 2d cgi digital art artwork painting illustration drawing sketch concept matte wallpaper poster
    cover trending artstation deviantart behance pixiv cgsociety featured national geographic unsplash
    watercolor watercolour oil acrylic gouache pastel charcoal ink pencil crayon impressionism impressionist
    expressionism expressionist cubism surrealism baroque renaissance rococo romanticism pop art nouveau deco
    anime manga cartoon comic disney pixar ghibli studio cyberpunk steampunk synthwave vaporwave retrowave retro
    vintage fantasy sci-fi scifi science fiction dark gothic noir horror western medieval futuristic y2k lo-fi lofi
    lowpoly low-poly poly voxel pixel pixel-art isometric cel shaded cel-shaded
    kodak portra ektar ektachrome kodachrome fujifilm fuji velvia ilford cinestill polaroid leica canon nikon sony
    hasselblad zeiss
    day night sunrise sunset dusk dawn twilight morning evening afternoon midnight rainy sunny foggy misty cloudy
    overcast stormy rain snow fog mist haze underwater outdoors indoors outdoor indoor background winter summer
    autumn
    interior exterior architectural architecture digest design
    """.split()
)
#: the last word of a short tag that makes it global whatever its adjectives: "neon lights", "warm tones",
#: "dark background", "8k wallpaper", "wide angle lens", "product shot", "fantasy concept art".
GLOBAL_HEADS = frozenset(
    """
    light lights lighting glow illumination shadows shadow focus quality resolution detail details background
    backdrop colors colours palette tones tone atmosphere mood ambience ambiance vibe vibes aesthetic aesthetics
    composition photography photo photograph shot picture render rendering painting illustration art artwork
    drawing sketch wallpaper lens film exposure grain bokeh style fantasy hour design
    """.split()
)
#: a segment starting with one of these word sequences is global: "by greg rutkowski", "trending on artstation",
#: "in the style of Moebius", "shot on Kodak Portra 400".
GLOBAL_LEADS: tuple[tuple[str, ...], ...] = tuple(
    tuple(lead.split())
    for lead in (
        "by",
        "art by",
        "artwork by",
        "painted by",
        "illustrated by",
        "photographed by",
        "photo by",
        "inspired by",
        "in the style of",
        "style of",
        "trending on",
        "featured on",
        "shot on",
        "shot with",
        "taken with",
        "taken on",
        "rendered in",
        "made in",
        "made with",
    )
)
#: nouns of a leading medium: a prompt (or segment) opening with "[a] [words] MEDIUM of" ("photo of",
#: "watercolor painting of", "cinematic still of", "a close-up photo of") keeps that opening in every prompt.
MEDIUM_NOUNS = frozenset(
    """
    photo photograph photography picture image snapshot selfie polaroid still frame shot closeup close-up portrait
    painting illustration drawing sketch render rendering artwork art print poster engraving etching woodcut
    linocut lithograph mural fresco collage cartoon comic animation watercolor watercolour view scene depiction
    """.split()
)
#: words that fill a leading medium before its noun although they are not tags ("a children's book illustration
#: of", "a low angle shot of", "a black and white photo of").
MEDIUM_FILLERS = frozenset("a an the and 's book children kids angle camera movie film game".split())
#: adverbs that open a quality tag, global even before a noun: "a highly detailed red car", "an ultra realistic cat".
TAG_INTENSIFIERS = frozenset("highly ultra hyper super extremely insanely intricately".split())
#: function words allowed inside a global tag ("depth of field", "trending on artstation", "rule of thirds").
GLOBAL_FUNCTION_WORDS = frozenset("a an the of and & with in on at by for to".split())
#: resolutions, lens and film figures and decades: "8k", "4k", "1080p", "35mm", "f/1.8", "1/500s", "80s", "1940s",
#: "16-bit", "400".
GLOBAL_FIGURE = re.compile(
    r"^(?:\d+(?:\.\d+)?(?:k|p|mm|px|fps|s|'s|x|-bit|bit|iso|mp)?|f/?\d+(?:\.\d+)?|\d+/\d+s?|\d+x\d+|iso\d+)$"
)

#: multi-word tags with a word that is not a tag word alone, global with tag words around them: "still life
#: painting", "black and white photography" (but "black and white cat" is a cat's colours).
GLOBAL_NAMES: tuple[tuple[str, ...], ...] = tuple(
    tuple(n.split()) for n in ("black and white", "b&w", "still life", "rule of thirds")
)

# --- other languages -----------------------------------------------------------------------------------------------

#: frequent function words (and a few colour words) of other languages written in Latin script, that are not English
#: words ("die", "de", "la", "da", "van", "do", "son" are left out: they occur in English prompts and names).
FOREIGN_FUNCTION_WORDS = frozenset(
    """
    der das des dem den ein eine einen einem einer eines und mit ist sind auf neben unter über vor hinter zwei nicht
    im zum zur vom roter rote rotes roten blaue blauer blaues blauen blauem grüne grüner grünes grünen gelbe gelber
    schwarze schwarzer weiße weißer weisse weisser
    le les une et avec dans sur est sont du des au aux chat chien rouge bleu bleue vert verte jaune blanc blanche
    el los las una y con en sobre junto es perro gato rojo roja azul verde amarillo amarilla negro negra blanco blanca
    il lo gli uno una e con di della dello sul sulla rosso rossa giallo gialla nero nera bianco bianca
    um uma com os umas uns preto preta branco branca vermelho vermelha cachorro
    een het en met rode blauwe groene gele zwarte witte
    """.split()
)
#: -ing words that spaCy may tag as a noun after a noun ("a woman in a blue shirt dancing"): an action, not a head.
ACTION_GERUNDS = frozenset(
    """
    dancing running walking playing sitting standing jumping flying swimming smiling laughing singing reading eating
    drinking sleeping talking fighting riding posing looking holding kissing hugging crying waving climbing skating
    surfing floating falling driving cooking staring resting lying leaning
    """.split()
)
#: English function words, counted against :data:`FOREIGN_FUNCTION_WORDS`.
ENGLISH_FUNCTION_WORDS = frozenset(
    """
    a an the and of with in on at to from by for is are was were be wearing next behind near under over above below
    beside between holding sitting standing that which who its his her their this these those
    """.split()
)
