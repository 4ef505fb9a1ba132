"""Drives a real Tresor KMIP server with PyKMIP's own client (ProxyKmipClient and, for a batch,
its KMIPProxy), and prints what it saw as one JSON object; tests/kmip.rs asserts on it.

usage: pykmip_scenario.py HOST PORT CA CERT_A KEY_A CERT_B KEY_B CERT_NARROW KEY_NARROW
"""
import json
import os
import ssl
import sys
import warnings

warnings.simplefilter("ignore")

from kmip.core import enums
from kmip.core import exceptions as core_exceptions
from kmip.core import attributes as core_attributes
from kmip.core import objects as core_objects
from kmip.core.factories import attributes as attribute_factory
from kmip.core.messages import messages, payloads
from kmip.core.primitives import Enumeration
from kmip.pie import client as pie_client
from kmip.pie import exceptions
from kmip.pie import objects

host, port, ca, cert_a, key_a, cert_b, key_b, cert_narrow, key_narrow = sys.argv[1:10]
port = int(port)
attrs = attribute_factory.AttributeFactory()
seen = {}


def connect(cert, key, version=enums.KMIPVersion.KMIP_1_2):
    return pie_client.ProxyKmipClient(
        hostname=host,
        port=port,
        cert=cert,
        key=key,
        ca=ca,
        ssl_version="PROTOCOL_TLS",
        kmip_version=version,
        config_file=os.devnull,
    )


def failure(call):
    """The result reason's name of a call that must fail."""
    try:
        call()
    except (exceptions.KmipOperationFailure, core_exceptions.OperationFailure) as e:
        return e.reason.name
    return "SUCCEEDED"


def locate(client, *attributes, **kw):
    return client.locate(attributes=list(attributes), **kw)


with connect(cert_a, key_a) as a:
    uid = a.create(
        enums.CryptographicAlgorithm.AES,
        256,
        name="vsan-disk-1",
        cryptographic_usage_mask=[
            enums.CryptographicUsageMask.ENCRYPT,
            enums.CryptographicUsageMask.DECRYPT,
        ],
    )
    seen["created"] = uid
    key = a.get(uid)
    seen["created_key_length"] = len(key.value)
    seen["created_key_hex"] = key.value.hex()
    seen["created_key_again_hex"] = a.get(uid).value.hex()

    material = os.urandom(16)
    registered = objects.SymmetricKey(
        enums.CryptographicAlgorithm.AES, 128, material, name="vsan-registered"
    )
    uid2 = a.register(registered)
    seen["registered"] = uid2
    seen["register_roundtrip"] = a.get(uid2).value == material

    _, attributes = a.get_attributes(uid, ["State", "Cryptographic Length", "Name"])
    got = {}
    for attribute in attributes:
        name = attribute.attribute_name.value
        value = attribute.attribute_value
        if name == "State":
            got[name] = value.value.name
        elif name == "Name":
            got[name] = value.name_value.value
        else:
            got[name] = value.value
    seen["attributes"] = got
    seen["attribute_list"] = sorted(a.get_attribute_list(uid))

    seen["locate_by_name"] = locate(a, attrs.create_attribute(enums.AttributeType.NAME, "vsan-disk-1"))
    seen["locate_pre_active"] = locate(
        a, attrs.create_attribute(enums.AttributeType.STATE, enums.State.PRE_ACTIVE)
    )
    seen["locate_max_one"] = locate(a, maximum_items=1)

    a.activate(uid)
    seen["locate_active"] = locate(
        a, attrs.create_attribute(enums.AttributeType.STATE, enums.State.ACTIVE)
    )
    seen["activate_twice"] = failure(lambda: a.activate(uid))
    seen["destroy_active"] = failure(lambda: a.destroy(uid))
    a.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, uid, revocation_message="disk retired")
    _, attributes = a.get_attributes(uid, ["State"])
    seen["state_after_revoke"] = attributes[0].attribute_value.value.name
    a.destroy(uid)
    _, attributes = a.get_attributes(uid, ["State"])
    seen["state_after_destroy"] = attributes[0].attribute_value.value.name
    seen["get_destroyed"] = failure(lambda: a.get(uid))
    seen["get_unknown"] = failure(lambda: a.get("00000000000000000000000000000000"))

    # A batch: Create, then Get Attribute List of the placeholder id, Discover Versions, Query.
    proxy = a.proxy
    template = core_objects.TemplateAttribute(
        attributes=[
            attrs.create_attribute(
                enums.AttributeType.CRYPTOGRAPHIC_ALGORITHM, enums.CryptographicAlgorithm.AES
            ),
            attrs.create_attribute(enums.AttributeType.CRYPTOGRAPHIC_LENGTH, 128),
            attrs.create_attribute(enums.AttributeType.NAME, "batch-key"),
        ]
    )
    create_item = messages.RequestBatchItem(
        operation=Enumeration(enums.Operation, enums.Operation.CREATE, tag=enums.Tags.OPERATION),
        request_payload=payloads.CreateRequestPayload(
            object_type=enums.ObjectType.SYMMETRIC_KEY, template_attribute=template
        ),
    )
    batch = [
        create_item,
        proxy._build_get_attribute_list_batch_item(uid=None),
        proxy._build_discover_versions_batch_item(),
        proxy._build_query_batch_item([enums.QueryFunction.QUERY_OPERATIONS]),
    ]
    response = proxy._send_and_receive_message(proxy._build_request_message(None, batch))
    items = response.batch_items
    seen["batch_statuses"] = [i.result_status.value.name for i in items]
    seen["batch_created"] = items[0].response_payload.unique_identifier
    seen["batch_listed_for"] = items[1].response_payload.unique_identifier
    seen["batch_versions"] = [
        "%d.%d" % (v.major, v.minor) for v in items[2].response_payload.protocol_versions
    ]
    seen["batch_operations"] = sorted(o.name for o in items[3].response_payload.operations)

    seen["encrypt_1_2"] = failure(lambda: a.encrypt(b"x", uid=uid2))
    # Attributes: rename, find by the new name, delete the name, modify what is not there.
    batch_uid = seen["batch_created"]
    a.modify_attribute(
        unique_identifier=batch_uid,
        attribute=attrs.create_attribute(enums.AttributeType.NAME, "batch-key-renamed"),
    )
    seen["locate_renamed"] = locate(
        a, attrs.create_attribute(enums.AttributeType.NAME, "batch-key-renamed")
    )
    a.delete_attribute(unique_identifier=batch_uid, attribute_name="Name", attribute_index=0)
    seen["attributes_after_delete"] = sorted(a.get_attribute_list(batch_uid))
    seen["modify_missing"] = failure(
        lambda: a.modify_attribute(
            unique_identifier=batch_uid,
            attribute=attrs.create_attribute("x-owner", "storage team"),
        )
    )

with connect(cert_a, key_a, enums.KMIPVersion.KMIP_1_4) as a14:
    seen["locate_by_name_1_4"] = locate(
        a14, attrs.create_attribute(enums.AttributeType.NAME, "vsan-registered")
    )
    seen["locate_offset_1_4"] = locate(a14, offset_items=1)
    # Encrypt and Decrypt (AES-GCM) under an active key, with additional data and the tag;
    # the same with altered additional data fails, and an inactive key cannot encrypt.
    gcm = a14.create(enums.CryptographicAlgorithm.AES, 256, name="mongodb-master")
    params = core_attributes.CryptographicParameters(
        block_cipher_mode=enums.BlockCipherMode.GCM,
        tag_length=16,
        cryptographic_algorithm=enums.CryptographicAlgorithm.AES,
    )

    def encrypt(uid_, data, aad):
        return a14.proxy.send_request_payload(
            enums.Operation.ENCRYPT,
            payloads.EncryptRequestPayload(
                unique_identifier=uid_,
                cryptographic_parameters=params,
                data=data,
                auth_additional_data=aad,
            ),
        )

    def decrypt(uid_, sealed, aad):
        return a14.proxy.send_request_payload(
            enums.Operation.DECRYPT,
            payloads.DecryptRequestPayload(
                unique_identifier=uid_,
                cryptographic_parameters=params,
                data=sealed.data,
                iv_counter_nonce=sealed.iv_counter_nonce,
                auth_additional_data=aad,
                auth_tag=sealed.auth_tag,
            ),
        )

    seen["encrypt_pre_active"] = failure(lambda: encrypt(gcm, b"patient 4711", b"ward 7"))
    a14.activate(gcm)
    sealed = encrypt(gcm, b"patient 4711", b"ward 7")
    seen["encrypted"] = [len(sealed.data), len(sealed.iv_counter_nonce), len(sealed.auth_tag)]
    seen["decrypted"] = decrypt(gcm, sealed, b"ward 7").data.decode()
    seen["decrypt_wrong_aad"] = failure(lambda: decrypt(gcm, sealed, b"ward 8"))


with connect(cert_b, key_b) as b:
    seen["b_get_a"] = failure(lambda: b.get(uid2))
    seen["b_destroy_a"] = failure(lambda: b.destroy(uid2))
    seen["b_locate"] = locate(b)

with connect(cert_narrow, key_narrow) as narrow:
    seen["narrow_get_outside"] = failure(lambda: narrow.get(seen["batch_created"]))
    seen["narrow_get_inside"] = len(narrow.get(uid2).value)
    seen["narrow_create_outside"] = failure(
        lambda: narrow.create(enums.CryptographicAlgorithm.AES, 128, name="other")
    )

try:
    with connect(None, None) as anonymous:
        anonymous.get(uid2)
    seen["no_certificate"] = "SUCCEEDED"
except Exception as e:  # the handshake fails: no certificate
    seen["no_certificate"] = type(e).__name__

print(json.dumps(seen))
