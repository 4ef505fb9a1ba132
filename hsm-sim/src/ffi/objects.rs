//! The C ABI of token objects: key generation, creation, destruction, attributes, search.

#![allow(non_snake_case, clippy::missing_safety_doc)]

use cryptoki_sys::*;

use super::{guard, read_mechanism, read_template, size, ulong, with_sim, write};
use crate::sim::{AttrOut, CallKind};

pub(super) unsafe extern "C" fn C_GenerateKey(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(|| {
        // SAFETY: the mechanism and template are the caller's input arguments.
        let (mech, template) =
            unsafe { (read_mechanism(mechanism)?, read_template(template, count)?) };
        let h = with_sim(CallKind::Session, |s| {
            s.generate_key(session, mech, &template)
        })?;
        // SAFETY: `key` is the caller's output argument for one handle.
        unsafe { write(key, h) }
    })
}

pub(super) unsafe extern "C" fn C_GenerateKeyPair(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    public_template: *mut CK_ATTRIBUTE,
    public_count: CK_ULONG,
    private_template: *mut CK_ATTRIBUTE,
    private_count: CK_ULONG,
    public_key: *mut CK_OBJECT_HANDLE,
    private_key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(|| {
        // SAFETY: the mechanism and both templates are the caller's input arguments.
        let (mech, public, private) = unsafe {
            (
                read_mechanism(mechanism)?,
                read_template(public_template, public_count)?,
                read_template(private_template, private_count)?,
            )
        };
        let (pub_h, priv_h) = with_sim(CallKind::Session, |s| {
            s.generate_key_pair(session, mech, &public, &private)
        })?;
        // SAFETY: the two handles are the caller's output arguments.
        unsafe {
            write(public_key, pub_h)?;
            write(private_key, priv_h)
        }
    })
}

pub(super) unsafe extern "C" fn C_CreateObject(
    session: CK_SESSION_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    object: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(|| {
        // SAFETY: the template is the caller's input argument of `count` attributes.
        let template = unsafe { read_template(template, count)? };
        let h = with_sim(CallKind::Session, |s| s.create_object(session, &template))?;
        // SAFETY: `object` is the caller's output argument for one handle.
        unsafe { write(object, h) }
    })
}

pub(super) unsafe extern "C" fn C_DestroyObject(
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(|| with_sim(CallKind::Session, |s| s.destroy(session, object)))
}

pub(super) unsafe extern "C" fn C_GetAttributeValue(
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    guard(|| {
        if count > 0 && template.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let attrs: &mut [CK_ATTRIBUTE] = if count == 0 {
            &mut []
        } else {
            // SAFETY: non-null, and the caller passes `count` attributes that it owns and lets
            // us update (C_GetAttributeValue's contract).
            unsafe { std::slice::from_raw_parts_mut(template, size(count)?) }
        };
        let types: Vec<CK_ATTRIBUTE_TYPE> = attrs.iter().map(|a| a.type_).collect();
        let found = with_sim(CallKind::Session, |s| {
            types
                .iter()
                .map(|t| s.get_attribute(session, object, *t))
                .collect::<Result<Vec<_>, _>>()
        })?;
        // PKCS#11 §5.7: report every attribute; the return code names the last problem.
        let mut rv = Ok(());
        for (a, out) in attrs.iter_mut().zip(found) {
            match out {
                AttrOut::Sensitive => {
                    a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                    rv = Err(CKR_ATTRIBUTE_SENSITIVE);
                }
                AttrOut::Invalid => {
                    a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                    rv = Err(CKR_ATTRIBUTE_TYPE_INVALID);
                }
                AttrOut::Value(v) => {
                    if a.pValue.is_null() {
                        a.ulValueLen = ulong(v.len())?;
                    } else if size(a.ulValueLen)? >= v.len() {
                        // SAFETY: the caller's buffer holds ulValueLen >= v.len() bytes.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                v.as_ptr(),
                                a.pValue.cast::<u8>(),
                                v.len(),
                            )
                        };
                        a.ulValueLen = ulong(v.len())?;
                    } else {
                        a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                        rv = Err(CKR_BUFFER_TOO_SMALL);
                    }
                }
            }
        }
        rv
    })
}

pub(super) unsafe extern "C" fn C_FindObjectsInit(
    session: CK_SESSION_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    guard(|| {
        // SAFETY: the template is the caller's input argument.
        let template = unsafe { read_template(template, count) }?;
        with_sim(CallKind::Session, |s| s.find_init(session, template))
    })
}

pub(super) unsafe extern "C" fn C_FindObjects(
    session: CK_SESSION_HANDLE,
    objects: *mut CK_OBJECT_HANDLE,
    max: CK_ULONG,
    count: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        if objects.is_null() && max > 0 {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let found = with_sim(CallKind::Session, |s| s.find(session, size(max)?))?;
        if !found.is_empty() {
            // SAFETY: `objects` has room for `max` >= found.len() handles.
            unsafe { std::ptr::copy_nonoverlapping(found.as_ptr(), objects, found.len()) };
        }
        // SAFETY: `count` is the caller's output argument.
        unsafe { write(count, ulong(found.len())?) }
    })
}

pub(super) unsafe extern "C" fn C_FindObjectsFinal(session: CK_SESSION_HANDLE) -> CK_RV {
    guard(|| with_sim(CallKind::Session, |s| s.find_final(session)))
}
