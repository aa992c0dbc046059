"""SentencePiece's model file (its ModelProto), read and edited without sentencepiece's generated
Python module.

That module (`sentencepiece.sentencepiece_model_pb2`) refuses to load under a protobuf runtime
older than the one it was generated with (sentencepiece 0.2.3: protobuf 7), while apache-beam,
which the [beam] extra installs, needs protobuf below 7. storygen needs few of the model's
fields, so it declares just those (numbers as in sentencepiece's `sentencepiece_model.proto`);
every other field is kept as an unknown field, so a model read and written again keeps it.

>>> model = ModelProto()
>>> model.pieces.add(piece="<en>", type=USER_DEFINED).type, model.pieces.add(piece="a").type == NORMAL
(4, True)
>>> ModelProto.FromString(model.SerializeToString()).pieces[0].piece
'<en>'
"""

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

# The piece types (ModelProto.SentencePiece.Type) that storygen tells apart.
NORMAL, USER_DEFINED = 1, 4


def _model_proto_class():
    field = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="storygen/spm_model.proto", package="storygen.spm", syntax="proto2")
    piece = file.message_type.add(name="SentencePiece")
    piece.field.add(name="piece", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    piece.field.add(name="score", number=2, type=field.TYPE_FLOAT, label=field.LABEL_OPTIONAL)
    # An enum in sentencepiece's file; an int32 has the same wire format.
    piece.field.add(name="type", number=3, type=field.TYPE_INT32, label=field.LABEL_OPTIONAL,
                    default_value=str(NORMAL))
    normalizer = file.message_type.add(name="NormalizerSpec")
    normalizer.field.add(name="normalization_rule_tsv", number=6, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    model = file.message_type.add(name="ModelProto")
    model.field.add(name="pieces", number=1, type=field.TYPE_MESSAGE, label=field.LABEL_REPEATED,
                    type_name=".storygen.spm.SentencePiece")
    model.field.add(name="normalizer_spec", number=3, type=field.TYPE_MESSAGE, label=field.LABEL_OPTIONAL,
                    type_name=".storygen.spm.NormalizerSpec")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("storygen.spm.ModelProto"))


ModelProto = _model_proto_class()
