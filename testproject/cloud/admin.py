from django.contrib import admin

from .models import Account, Instance, Region, Volume

admin.site.register(Account)
admin.site.register(Instance)
admin.site.register(Volume)
admin.site.register(Region)
